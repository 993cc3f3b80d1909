#!/usr/bin/env bash
# Download the wheels a bare GPU host lacks (bench/gpu_wheels.txt, hash-checked) into .whl/ in
# this checkout, which git ignores and the device call carries (`carry: [".whl"]`).
# Needs pip and a package index, here; the GPU host needs neither.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
args=()
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${args[@]}" --require-hashes -r "$ROOT/bench/gpu_wheels.txt" \
  -d "$ROOT/.whl"
ls -l "$ROOT/.whl"
du -sh "$ROOT/.whl"
