#!/usr/bin/env bash
# The GPU benchmark end to end, on a CUDA host with its preinstalled torch and no network:
# build a GPT-2-small-sized decoder (12 layers, 768 wide, 12 heads, context 1024, our 8192-token
# vocabulary; one training step, so near-random weights, which is all a speed test needs),
# export it in the torch format (what is served: CUDA graphs) and as ONNX, then sweep the served
# model over gRPC against Hugging Face `generate` on the same GPU, weights and prompts.
#
#   bench/gpu.sh                 CUDA: GPT-2 small, concurrency 1..32, 128 in / 128 out tokens
#   bench/gpu.sh --device cpu    a tiny model through the same steps on CPU (what the test runs)
#   bench/gpu.sh --out DIR       checkpoint, repository and report [runs/gpu-bench-DEVICE]
#   bench/gpu.sh --skip-onnx     no ONNX export (its tracing takes minutes at GPT-2 size)
#
# Needs the project's dependencies importable (run from anywhere: PYTHONPATH is set to this
# checkout) and, for the hf baseline, transformers (`pip install -e '.[train,bench]'`); without it the
# report lists hf as skipped, with the reason. PYTHON picks the interpreter [python].
set -euo pipefail

DEVICE=cuda
OUT=""
ONNX=1
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --skip-onnx) ONNX=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
OUT="${OUT:-$ROOT/runs/gpu-bench-$DEVICE}"
NAME=lm

if [ "$DEVICE" = cpu ]; then
  # The runtime tests' tiny shape; a few short requests keep the whole run near a minute.
  SHAPE=(n_layer=2 n_head=2 n_embd=64 block_size=96)
  TRAIN=(batch_size=4 eval_windows=4)
  SWEEP=(--concurrency 1,2 --num-prompts 4 --input-len 8 --output-len 8 --warmup 1 --threads 1)
else
  SHAPE=(n_layer=12 n_head=12 n_embd=768 block_size=1024)  # GPT2_SMALL in plugins/decoder_lm/model.py
  TRAIN=(batch_size=8 eval_windows=16)  # one step; a short evaluation
  # Up to 32 in flight: the server gets 32 KV slots (--max-num-seqs) so none has to queue.
  SWEEP=(--concurrency 1,4,8,16,32 --input-len 128 --output-len 128 "--serve-arg=--max-num-seqs=32")
fi
CONFIG=()
for kv in "${SHAPE[@]}" "${TRAIN[@]}"; do CONFIG+=(--config "$kv"); done

run() { echo "+ $*" >&2; "$@"; }

run "$PY" -m engine train decoder-lm --out "$OUT/ckpt" --steps 1 --device "$DEVICE" \
  "${CONFIG[@]}" --no-progress
run "$PY" -m engine export "$OUT/ckpt" --repo "$OUT/repo" --name "$NAME" --format torch \
  --force --no-progress
if [ "$ONNX" = 1 ]; then
  run "$PY" -m engine export "$OUT/ckpt" --repo "$OUT/repo" --name "$NAME-onnx" --format onnx \
    --force --no-progress
fi
# One greedy request through the torch runtime on the device: fails fast, before the sweep.
run "$PY" -m engine generate "def fib(n):" --repo "$OUT/repo" --model "$NAME" --device "$DEVICE" \
  --max-tokens 8 --temperature 0 --no-stream

# The sweep: the served torch-format model against HF generate. Off CPU, `--device` puts the
# server and the baselines (BaselineContext.device) on the GPU.
BENCH=("$PY" -m engine bench run --repo "$OUT/repo" --model "$NAME" --baselines grpc,hf --out "$OUT/bench" --no-progress "${SWEEP[@]}")
[ "$DEVICE" = cpu ] || BENCH+=(--device "$DEVICE")
run "${BENCH[@]}"
echo "gpu.sh: done; report in $OUT/bench" >&2
