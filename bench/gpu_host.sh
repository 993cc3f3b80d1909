#!/usr/bin/env bash
# The whole GPU run in one device call, on a bare GPU host (python3 with torch, no network):
#
#   device run:  command "bash bench/gpu_host.sh", carry [".whl"], timeout_s 600
#
# 1. installs the carried wheels (.whl/, from bench/fetch_wheels.sh) whose package the host
#    lacks or has outside pyproject.toml's range, with pip --no-index --target, onto PYTHONPATH;
# 2. checks every requirement against pyproject.toml (bench/check_env.py; stops if one fails);
# 3. runs bench/gpu.sh into $OUT (the device tool's folder; runs/gpu-host elsewhere), cut off
#    after GPU_HOST_LIMIT_S seconds [470] so the files still come back inside the call's limit.
# $OUT then holds gpu.log (all of the above, unbuffered) and small/, medium/ with bench.json and
# two PNGs each. Arguments go to gpu.sh (e.g. --shapes small, --no-cuda-graphs, --device cpu).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/runs/gpu-host}"
SITE="${GPU_HOST_SITE:-/tmp/engine-site}"
LIMIT="${GPU_HOST_LIMIT_S:-470}"
DEVICE=cuda
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --device ] && { j=$((i + 1)); DEVICE="${!j}"; }; done
export PYTHONUNBUFFERED=1 ENGINE_CACHE_DIR="${ENGINE_CACHE_DIR:-/tmp/engine-cache}"
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
say() { echo "gpu_host.sh: $*" | tee -a "$LOG"; }

say "$(date -u +%FT%TZ) on $(hostname); $(python3 --version 2>&1) at $(command -v python3)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 \
    | tee -a "$LOG"
fi
WHEELS="$(python3 bench/check_env.py --needed-wheels .whl 2>&1)" || {
  say "FAILED: cannot read the carried wheels: $WHEELS"; exit 3; }
if [ -n "$WHEELS" ]; then
  say "installing $(echo "$WHEELS" | xargs -n1 basename | tr '\n' ' ')into $SITE"
  # shellcheck disable=SC2086 # one path per word
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $WHEELS 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "FAILED: pip could not install the wheels"; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 bench/check_env.py --extras train,bench,dev --not-needed ruff,grpcio-tools,tritonclient \
  --device "$DEVICE" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || { say "FAILED: the host misses requirements (above)"; exit 4; }

timeout -k 10 "$LIMIT" bash bench/gpu.sh --out "$OUT" "$@"  # gpu.sh appends to gpu.log itself
rc=$?
[ "$rc" = 124 ] && say "FAILED: gpu.sh ran past ${LIMIT} s and was stopped"
exit "$rc"
