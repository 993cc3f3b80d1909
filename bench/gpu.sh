#!/usr/bin/env bash
# The GPU benchmark end to end, on a CUDA host with its own python3, torch and no network.
# In order: the `gpu`-marked tests; then per shape a decoder built on the GPU, exported in the
# torch format (what is served: CUDA graphs) and benchmarked over gRPC and in process against
# Hugging Face `generate` on the same GPU, weights, dtype and prompts.
#
#   small   GPT-2-small shape: 12 layers x 768, 12 heads, context 1024; 40 training steps, so
#           greedy tokens are not near ties everywhere and agreement with HF means something;
#           baselines grpc, inprocess, hf (eager) and hf-static (static cache + torch.compile,
#           where the installed transformers has it; at 1 and 64 streams: it compiles per shape)
#   medium  GPT-2-medium shape: 24 layers x 1024, 16 heads, context 1024; one training step;
#           baselines grpc, inprocess, hf
# Both: fp16, 128 prompt + 128 output tokens, 1, 4, 16 and 64 streams, 64 KV slots sized from
# --gpu-memory-utilization, our 8192-token vocabulary.
#
#   bench/gpu.sh                 on CUDA, into runs/gpu-bench-cuda
#   bench/gpu.sh --device cpu    tiny shapes through the same steps on CPU (the tested dry run)
#   --out DIR        the report only: gpu.log, SHAPE/bench.json and two PNGs per shape (7 files)
#   --work DIR       checkpoints and model repositories [a temporary dir, removed at the end]
#   --shapes LIST    small,medium [both]          --budget-s S   time for it all [420 on CUDA]
#   --dtype NAME     float16 [on CUDA]            --no-cuda-graphs   eager decode (a fallback)
#   --onnx           also export ONNX (~376 MB per graph at GPT-2 size; the bench never loads it)
#   --no-tests       skip the gpu-marked tests
#
# Exit 0 only if every test passed and everything asked for was measured; otherwise the log
# ends with "gpu.sh: FAILED:" and what failed (bench skips and failed requests included).
# PYTHON picks the interpreter [python3]; run from anywhere (PYTHONPATH gets this checkout).
set -uo pipefail

DEVICE=cuda OUT="" WORK="" SHAPES=small,medium BUDGET="" DTYPE="" GRAPHS=1 ONNX=0 TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --shapes) SHAPES="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --no-cuda-graphs) GRAPHS=0; shift ;;
    --onnx) ONNX=1; shift ;;
    --no-tests) TESTS=0; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/runs/gpu-bench-$DEVICE}"
mkdir -p "$OUT"
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
LOG="$OUT/gpu.log"
exec > >(tee -a "$LOG") 2>&1  # everything below also lands in the report's log
FAILED=()
fail() { echo "gpu.sh: FAIL: $*"; FAILED+=("$*"); }
run() { echo "+ [${SECONDS}s] $*"; "$@"; }

if [ "$DEVICE" = cpu ]; then
  BUDGET="${BUDGET:-0}"  # 0: no limit
  SWEEP=(--concurrency 1,2 --num-prompts 4 --input-len 8 --output-len 8 --warmup 1 --threads 1)
  SERVE=(--max-num-seqs 2)
  STATIC_AT=1
else
  BUDGET="${BUDGET:-420}"
  SWEEP=(--concurrency 1,4,16,64 --input-len 128 --output-len 128 --device "$DEVICE")
  SERVE=(--max-num-seqs 64 --gpu-memory-utilization 0.3)
  STATIC_AT=1,64
  DTYPE="${DTYPE:-float16}"
fi
[ -n "$DTYPE" ] && SERVE+=(--dtype "$DTYPE")
[ "$GRAPHS" = 1 ] || SERVE+=(--no-cuda-graphs)
MEDIUM_RESERVE=170  # seconds the small shape leaves for the medium one (when both run)

# shape -> training overrides and steps (GPT2_SMALL / GPT2_MEDIUM in plugins/decoder_lm/model.py)
shape_config() {
  case "$DEVICE:$1" in
    cpu:small) echo "2 n_layer=2 n_head=2 n_embd=64 block_size=96 batch_size=4 eval_windows=4" ;;
    cpu:medium) echo "1 n_layer=3 n_head=4 n_embd=64 block_size=96 batch_size=4 eval_windows=4" ;;
    *:small) echo "40 n_layer=12 n_head=12 n_embd=768 block_size=1024 batch_size=8 eval_windows=16 warmup_steps=10 lr=0.0006" ;;
    *:medium) echo "1 n_layer=24 n_head=16 n_embd=1024 block_size=1024 batch_size=8 eval_windows=16" ;;
    *) return 1 ;;
  esac
}

echo "gpu.sh: $(date -u +%FT%TZ) device=$DEVICE shapes=$SHAPES budget=${BUDGET}s out=$OUT"
"$PY" - <<'EOF' || fail "the interpreter lacks a package the run needs (see above)"
import sys, grpc, google.protobuf as pb
print(f"grpcio {grpc.__version__}, protobuf {pb.__version__}, python {sys.version.split()[0]}")
import torch, transformers
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, {cuda}")
EOF

if [ "$TESTS" = 1 ]; then
  run "$PY" -m pytest -m gpu -q -p no:cacheprovider -o timeout=180 "$ROOT/tests" \
    || fail "gpu-marked tests (pytest exit $?)"
fi

# hf-static only where this transformers can compile a static cache (said why otherwise)
STATIC="$("$PY" -c "
from bench.baselines.hf import HFStaticCompiled as H
r = H.why_unavailable('$DEVICE'); print('yes' if r is None else r)" 2>&1 | tail -1)"
[ "$STATIC" = yes ] || echo "gpu.sh: hf-static left out: $STATIC"

for SHAPE in ${SHAPES//,/ }; do
  spec="$(shape_config "$SHAPE")" || { fail "unknown shape $SHAPE"; continue; }
  read -r STEPS OVERRIDES <<<"$spec"
  CONFIG=()
  for kv in $OVERRIDES; do CONFIG+=(--config "$kv"); done
  CKPT="$WORK/$SHAPE-ckpt" REPO="$WORK/repo"
  run "$PY" -m engine train decoder-lm --out "$CKPT" --steps "$STEPS" --device "$DEVICE" \
    "${CONFIG[@]}" --no-progress || { fail "$SHAPE: training"; continue; }
  run "$PY" -m engine export "$CKPT" --repo "$REPO" --name "$SHAPE" --format torch --force \
    --no-progress || { fail "$SHAPE: torch export"; continue; }
  if [ "$ONNX" = 1 ]; then
    run "$PY" -m engine export "$CKPT" --repo "$REPO" --name "$SHAPE-onnx" --format onnx \
      --force --no-progress || fail "$SHAPE: ONNX export"
  fi
  BASELINES=grpc,inprocess,hf ONLY=()
  if [ "$SHAPE" = small ] && [ "$STATIC" = yes ]; then
    BASELINES+=,hf-static ONLY=(--only-at "hf-static=$STATIC_AT")
  fi
  TIME=()
  if [ "$BUDGET" != 0 ]; then
    left=$((BUDGET - SECONDS))
    [ "$SHAPE" = small ] && [[ ",$SHAPES," == *,medium,* ]] && left=$((left - MEDIUM_RESERVE))
    [ "$left" -gt 0 ] || { fail "$SHAPE: no time left of the ${BUDGET} s budget"; continue; }
    TIME=(--time-budget-s "$left")
  fi
  run "$PY" -m engine bench run --repo "$REPO" --model "$SHAPE" --baselines "$BASELINES" \
    "${ONLY[@]}" "${SWEEP[@]}" "${SERVE[@]}" "${TIME[@]}" --strict --no-progress \
    --out "$OUT/$SHAPE" || fail "$SHAPE: bench (something asked for was not measured)"
  rm -rf "$CKPT"  # a GPT-2-medium checkpoint with its optimizer state is ~4 GB
done

echo "gpu.sh: ${SECONDS}s; report in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "gpu.sh: done"
