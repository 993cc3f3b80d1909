"""The exporter's graph rewrites keep what a graph computes and change how it is stored or run.

``share_transposed_weights`` (a tied table stored once), and the quantizer's inverses of it
and of the paged graph's ``Gemm`` projections, each checked on a small graph run by
onnxruntime before and after.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx_graph import share_transposed_weights
from exporters.quantize import gemms_to_matmuls, tied_embeddings, unshare_transposed_tables

V, C = 96, 64  # 6,144 elements: above share_transposed_weights' 4,096


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so).run(None, feeds)


def _tied_lm() -> onnx.ModelProto:
    """Embedding lookup + head, as the fp32 export leaves them: the table and its transpose."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, C)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
            helper.make_node("MatMul", ["emb", "head"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "head")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


def test_a_tied_table_is_stored_once_and_looked_up_by_rows(tmp_path):
    path = tmp_path / "tied.onnx"
    onnx.save(_tied_lm(), str(path))
    feeds = {"ids": np.array([[3, 95, 0], [7, 7, 50]], np.int64)}
    before = _run(onnx.load(str(path)), feeds)

    assert share_transposed_weights(path) == ["head -> Transpose(table)"]
    model = onnx.load(str(path))
    assert [t.name for t in model.graph.initializer] == ["table"]
    ops = {n.op_type: n for n in model.graph.node}
    assert ops["Gather"].input[0] == "table" and ops["Gather"].attribute[0].i == 0  # rows
    assert (
        ops["Transpose"].input == ["table"] and ops["MatMul"].input[1] == ops["Transpose"].output[0]
    )
    np.testing.assert_array_equal(_run(model, feeds)[0], before[0])
    assert share_transposed_weights(path) == []  # nothing left to share


def test_quantizing_a_shared_export_finds_the_head_weight_and_its_tied_table_again(tmp_path):
    path = tmp_path / "tied.onnx"
    onnx.save(_tied_lm(), str(path))
    share_transposed_weights(path)
    model = onnx.load(str(path))
    feeds = {"ids": np.array([[1, 2, 90]], np.int64)}
    before = _run(model, feeds)

    assert unshare_transposed_tables(model.graph) == ["table"]
    assert not any(n.op_type == "Transpose" for n in model.graph.node)
    head = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert head.input[1] in {t.name for t in model.graph.initializer}  # a constant: quantizable
    lookup = next(n for n in model.graph.node if n.op_type == "Gather")
    assert tied_embeddings(model.graph) == {lookup.name or lookup.output[0]: head.output[0]}
    np.testing.assert_array_equal(_run(model, feeds)[0], before[0])


def test_gemm_projections_become_matmuls_the_quantizer_reads_and_a_label_head_stays():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((48, C)).astype(np.float32)  # (N, K): Gemm with transB
    bias = rng.standard_normal(48).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
            helper.make_node("Gemm", ["y", "w2"], ["z"]),  # (K, N), no bias
            helper.make_node("Gemm", ["x", "w", "b"], ["scaled"], transB=1, alpha=0.5),
            helper.make_node("Gemm", ["z", "labels"], ["logits"]),  # 40 -> 5: one block short
        ],
        "gemms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["n", 48]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(rng.standard_normal((48, 40)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal((40, 5)).astype(np.float32), "labels"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    feeds = {"x": rng.standard_normal((5, C)).astype(np.float32)}
    before = _run(model, feeds)

    # the scaled one is left as it is, and so is the label head (narrower than a block of 32)
    assert gemms_to_matmuls(model.graph, min_width=32) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul", "Gemm", "Gemm"]
    after = _run(model, feeds)
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
