"""One-row attention matmuls in onnxruntime, with and without a scale folded in as ``alpha``.

onnxruntime folds ``Mul(MatMul(a, b), c)`` (or a scaled input) into ``FusedMatMul(alpha=c)``;
MLAS's kernel for a one-row left operand (what every decode step's attention runs) takes alpha
1 only, so a folded scale sends those matmuls to the general kernel. This times single-node
graphs at a decode step's shapes, interleaved, process CPU time, one thread:

- ``paged``: the paged graph's scores, one (1 x D) x (D x 16) product per pool block and head;
- ``dense``: the dense graph's, one (1 x D) x (D x L) product per row and head.

    python bench/matmul_alpha.py [--blocks 160] [--rows 16] [--cached 160] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def session(shape_a, shape_b, alpha: float):
    """A one-node ``FusedMatMul(a, b^T, alpha)`` graph."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node(
        "FusedMatMul", ["a", "b"], ["c"], domain="com.microsoft", transB=1, alpha=alpha
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, shape_a),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, shape_b),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=160, help="paged: pool blocks")
    ap.add_argument("--rows", type=int, default=16, help="dense: batch rows")
    ap.add_argument("--cached", type=int, default=160, help="dense: cached tokens a row")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    H, D, rng = args.heads, args.head_dim, np.random.default_rng(0)
    shapes = {
        "paged": ([args.blocks, H, 1, D], [args.blocks, H, args.block_size, D]),
        "dense": ([args.rows, H, 1, D], [args.rows, H, args.cached, D]),
    }
    cases = {}
    for name, (a, b) in shapes.items():
        feeds = {"a": rng.random(a, np.float32), "b": rng.random(b, np.float32)}
        for alpha in (1.0, 1.0 / np.sqrt(D)):
            cases[f"{name}, alpha {alpha:g}"] = (session(a, b, float(alpha)), feeds)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for key, (s, feeds) in cases.items():
            for _ in range(5):
                s.run(None, feeds)
            c0 = time.process_time()
            for _ in range(200):
                s.run(None, feeds)
            times[key].append(1e6 * (time.process_time() - c0) / 200)
    print(f"# CPU us per call: median (min-max) of {args.rounds} interleaved rounds")
    for key, t in times.items():
        print(f"{key:24s} {statistics.median(t):7.1f} ({min(t):.1f}-{max(t):.1f})")


if __name__ == "__main__":
    main()
