#!/usr/bin/env bash
# GPU smoke test (one GPU, a few minutes): the GPU-only paths the CPU suite cannot reach.
#   - the online IRL loop with learners on CUDA (torch and DeepSpeed ZeRO-2 over NCCL), collective weight sync
#     from CUDA learners (gloo on one GPU; the NCCL path runs when 3+ GPUs are present),
#   - rollouts with the official vLLM wheel on CUDA (skipped with a reason when vllm is absent),
#   - reward-model scoring on the GPU: step rewards checked against the CPU's, then throughput.
# Prints one JSON line per check with its timing; exits non-zero if a check fails. Extra args go to pytest
# (scripts/device_smoke.sh adds a per-test --timeout). Works without installing the package (src on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m pytest -v -m gpu tests/gpu -rA --durations=0 "$@"
