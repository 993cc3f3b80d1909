"""Weight-only 8-bit quantization of an exported graph with onnxruntime's own tools (torch-free).

``MatMulNBitsQuantizer`` turns every MatMul with a constant weight into ``MatMulNBits`` (8-bit
weights in blocks of ``block_size`` along the input axis, one scale and zero point per block;
``accuracy_level`` 4 lets onnxruntime quantize the activations to int8 per row and block
inside the kernel, so a row's result never depends on the other rows of the batch). The
embedding tables then become ``GatherBlockQuantized`` lookups in the same layout; a table tied
to an output head (GPT-2's ``wte`` / ``lm_head``) reads the head's quantized weights through a
Reshape, so the file stores it once.

Why this scheme and not ``quantize_dynamic`` or static QDQ: measured on this project's decoder
(README, "int8"), dynamic quantization computes one activation scale over the whole batch, so a
request's tokens change with its neighbours; static QDQ lost 3-4% top-1 and ran slower than fp32
at 16 streams; 4-bit weights lost 4-5% top-1 for no speed over 8-bit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantScheme:
    """How weights are quantized; the defaults are the measured choice for CPUs (README)."""

    bits: int = 8
    block_size: int = 32  # same speed as 128 here, and the scales track outliers more closely
    accuracy_level: int = 4  # int8 activations inside MatMulNBits: the VNNI kernels
    symmetric: bool = False  # a zero point per block: no range lost on skewed blocks
    min_gather_rows: int = 1024  # quantize lookup tables with this many rows (vocabularies)


INT8 = QuantScheme()


def quantize_graph(path: Path, scheme: QuantScheme = INT8) -> dict[str, Any]:
    """Quantize ``path`` in place; return what changed, for the manifest."""
    nbits = _nbits_module()
    before = path.stat().st_size
    model = onnx.load(str(path))
    ops_before = _op_counts(model.graph)
    unshared = unshare_transposed_tables(model.graph)
    gemms = gemms_to_matmuls(model.graph, min_width=scheme.block_size)
    tied = tied_embeddings(model.graph)
    quantizer = nbits.MatMulNBitsQuantizer(
        model,
        bits=scheme.bits,
        block_size=scheme.block_size,
        is_symmetric=scheme.symmetric,
        accuracy_level=scheme.accuracy_level,
    )
    quantizer.process()
    model = quantizer.model.model
    tables = quantize_gathers(model.graph, scheme, tied)
    _drop_unused_initializers(model.graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    ops_after = _op_counts(model.graph)
    return {
        "method": "onnxruntime MatMulNBitsQuantizer (weight-only) + GatherBlockQuantized",
        **asdict(scheme),
        "matmuls_quantized": ops_after.get("MatMulNBits", 0),
        "matmuls_left_fp32": ops_after.get("MatMul", 0),
        "matmuls_before": ops_before.get("MatMul", 0),
        "gathers": tables,
        "unshared_tables": unshared,
        "gemms_as_matmuls": gemms,
        "bytes_fp32": before,
        "bytes_int8": path.stat().st_size,
    }


def unshare_transposed_tables(graph: onnx.GraphProto) -> list[str]:
    """Store again, as a constant, the transpose of a tied table the fp32 export kept once.

    ``exporters.onnx_graph.share_transposed_weights`` keeps the (V, C) table and gives the
    head's ``MatMul`` a ``Transpose`` of it. The quantizer only quantizes a ``MatMul`` whose
    weight is a constant, so a graph exported that way (an fp32 version quantized afterwards)
    gets its (C, V) weight back here; the table is then found tied to the head's 8-bit
    weights like any other, and the fp32 copies are dropped with the other replaced tables.
    Graphs from before that change gathered the head's columns (``Gather`` along axis 1, then
    a ``Transpose``): those get their plain (V, C) lookup table back.
    """
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    restored = []
    for node in list(graph.node):
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
        if node.op_type == "Transpose" and node.input[0] in inits and perm == [1, 0]:
            table = inits[node.input[0]]
            weight = numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(table).T), node.output[0]
            )
            graph.initializer.append(weight)
            graph.node.remove(node)
            restored.append(table.name)
            continue
        if node.op_type != "Gather" or _gather_axis(node) != 1 or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        after = consumers.get(node.output[0], [])
        if len(weight.dims) != 2 or len(after) != 1 or after[0].op_type != "Transpose":
            continue
        transpose = after[0]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [])
        if not perm or perm != [*range(1, len(perm)), 0]:
            continue
        table = numpy_helper.from_array(
            np.ascontiguousarray(numpy_helper.to_array(weight).T), f"{weight.name}__table"
        )
        graph.initializer.append(table)
        gather = helper.make_node(
            "Gather", [table.name, node.input[1]], list(transpose.output), name=node.name, axis=0
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.remove(transpose)
        graph.node.insert(position, gather)
        restored.append(weight.name)
    return restored


def gemms_to_matmuls(graph: onnx.GraphProto, min_width: int = 1) -> int:
    """Rewrite each ``Gemm`` with a constant weight as ``MatMul`` (+ ``Add`` of its bias).

    The paged decode graph runs its projections as ``Gemm`` (bias fused, one node fewer a
    projection); the quantizer only quantizes ``MatMul`` (``MatMulNBits`` has no ``Gemm``
    form), so those get their (K, N) weight and a separate bias ``Add`` back first. A weight
    with fewer than ``min_width`` inputs or outputs (a classifier's label head: less than one
    quantization block, nothing to save, and its logits are what accuracy is judged on) stays
    a ``Gemm``, in fp32. Returns how many were rewritten.
    """
    inits = {t.name: t for t in graph.initializer}
    done = 0
    for node in list(graph.node):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if attrs.get("transA", 0) or not plain:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        if weight.ndim != 2 or min(weight.shape) < min_width:
            continue
        name = f"{node.input[1]}__kn" if attrs.get("transB", 0) else node.input[1]
        if name != node.input[1]:
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}__matmul" if bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], name], [product], name=node.name)]
        if bias:
            new.append(helper.make_node("Add", [product, bias], [node.output[0]]))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, added in enumerate(new):
            graph.node.insert(position + offset, added)
        done += 1
    return done


def tied_embeddings(graph: onnx.GraphProto) -> dict[str, str]:
    """Map each Gather whose table is the transpose of a MatMul's weight to that MatMul's output.

    GPT-2 ties ``lm_head.weight`` to ``wte``: the exported graph holds the table (V, C) for the
    lookup and its transpose (C, V) for the head, two copies of the same numbers.
    """
    inits = {t.name: t for t in graph.initializer}
    weights: dict[tuple[int, ...], list[tuple[str, onnx.TensorProto]]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            t = inits[node.input[1]]
            weights.setdefault(tuple(t.dims), []).append((node.output[0], t))
    tied: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or _gather_axis(node) != 0:
            continue
        table = inits[node.input[0]]
        candidates = weights.get(tuple(reversed(table.dims)), []) if len(table.dims) == 2 else []
        if not candidates:
            continue
        values = numpy_helper.to_array(table)
        for output, weight in candidates:
            if np.array_equal(numpy_helper.to_array(weight).T, values):
                tied[node.name or node.output[0]] = output
                break
    return tied


def quantize_gathers(
    graph: onnx.GraphProto, scheme: QuantScheme, tied: dict[str, str]
) -> list[dict[str, Any]]:
    """Replace large fp32 Gather tables by GatherBlockQuantized; tied ones share the head's data.

    The table (V, C) is quantized in blocks along C, which is exactly MatMulNBits' layout for
    the head's weight (N=V, K=C): blocks along K per output row. So a tied table is the head's
    packed weight reshaped from (V, C/block, block) to (V, C) with the head's scales and zero
    points. Tables whose width is not a multiple of the block stay fp32 (the packed rows would
    carry padding).
    """
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    report = []
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits or _gather_axis(node) != 0:
            continue
        table = inits[node.input[0]]
        rows, width = (list(table.dims) + [0, 0])[:2]
        if len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT:
            continue
        if width % scheme.block_size or rows < scheme.min_gather_rows:
            continue
        key = node.name or node.output[0]
        head = producers.get(tied.get(key, ""))
        if head is not None and head.op_type == "MatMulNBits":
            packed, scales, zeros = head.input[1], head.input[2], head.input[3:4]
            shared = True
        else:
            packed, scales, zeros = _add_quantized_table(graph, table, scheme)
            shared = False
        shape = numpy_helper.from_array(
            np.array([rows, width * scheme.bits // 8], np.int64), f"{key}_table_shape"
        )
        graph.initializer.append(shape)
        data = f"{key}_table_q{scheme.bits}"
        reshape = helper.make_node("Reshape", [packed, shape.name], [data], name=f"{key}_table")
        lookup = helper.make_node(
            "GatherBlockQuantized",
            [data, node.input[1], scales, *zeros],
            list(node.output),
            name=f"{key}_q{scheme.bits}",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=scheme.block_size,
            bits=scheme.bits,
        )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, lookup)
        graph.node.insert(position, reshape)
        report.append({"table": table.name, "shape": [rows, width], "shared_with_head": shared})
    return report


def _add_quantized_table(
    graph: onnx.GraphProto, table: onnx.TensorProto, scheme: QuantScheme
) -> tuple[str, str, list[str]]:
    """Quantize a (V, C) table in MatMulNBits' layout; add packed data, scales, zero points."""
    nbits = _nbits_module()
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=scheme.block_size, is_symmetric=scheme.symmetric, bits=scheme.bits
    )
    values = numpy_helper.to_array(table)
    packed, scales, zeros = nbits.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(values.T)  # (K=C, N=V): blocks along C for every row of the table
    )
    names = [f"{table.name}_Q{scheme.bits}", f"{table.name}_scales", f"{table.name}_zero_points"]
    arrays = [packed, scales] + ([] if scheme.symmetric else [zeros])
    graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names))
    return names[0], names[1], names[2:3] if not scheme.symmetric else []


def _nbits_module() -> Any:
    """onnxruntime's MatMulNBits quantizer module, imported without its logging side effects.

    It calls ``logging.basicConfig(level=INFO)`` at import, which would print every INFO line
    of every library (onnx_ir, the exporters) for the rest of the process.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _gather_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads (the fp32 tables the quantized ops replaced)."""
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
