#!/usr/bin/env bash
# The one command a session runs on the lent GPU machine (bare, offline, Python 3.12 with CUDA torch):
#   device tool `run`: command "bash scripts/device_smoke.sh", carry [".whl"], timeout_s 540
# First, here: bash scripts/fetch_device_wheels.sh (Ray, DeepSpeed and the deps the image lacks, into .whl/).
# Installs the carried wheels into /tmp/site, prints the GPU and what imports, runs scripts/gpu_smoke.sh with a
# per-test timeout, and tees everything to $OUT/gpu_smoke.log ($OUT/ray_logs.tgz too when a check fails).
# Bounded whatever hangs: about 4 min expected, pytest stopped at 6 min, under 9 min in all.
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
    echo "== exit $rc"
    return $rc
}

main 2>&1 | tee "$OUT/gpu_smoke.log"
exit "${PIPESTATUS[0]}"
