"""One torch module to one ONNX file: trace, name the dynamic axes, optimize, convert to fp16.

Generic over architectures: everything comes from the module and its ExportSignature. Tracing
tries the dynamo exporter first (``torch.export`` + onnxscript) and falls back to the TorchScript
exporter, recording which one produced the graph.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from engine.architecture import ExportSignature
from exporters.base import TraceFailed

EXPORTER_ENV = "ENGINE_ONNX_EXPORTER"  # auto (dynamo, then torchscript), dynamo or torchscript
DEFAULT_OPSET = 20  # 17 for LayerNormalization; 20 for Gelu as one op (not 8 per layer)

# Ops kept in fp32 by the fp16 conversion: reductions and exponentials whose fp16 range or
# rounding breaks softmax/LayerNorm numerics (sum of exp overflows 65504, variance underflows).
FP16_KEEP_FP32 = (
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Exp",
    "Log",
    "Erf",
    "CumSum",
    "Range",
)


# Loggers whose records during an export are torch's own business (e.g. "torchvision is not
# installed. Skipping torchvision::nms", eight lines per graph): the stage display is ours.
TORCH_EXPORT_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "onnxscript",
)


@contextlib.contextmanager
def quiet_exporter_logs():
    """Silence torch's and onnxscript's own log lines while a graph is traced, then restore."""
    loggers = [logging.getLogger(name) for name in TORCH_EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _dynamic_shapes(module: torch.nn.Module, signature: ExportSignature, args: tuple) -> tuple:
    """Build torch.export ``dynamic_shapes`` that mirror how ``forward`` binds ``args``.

    Axis names that are identifiers become shared ``Dim`` objects (so ``batch`` is one symbol
    everywhere); derived names such as ``past_sequence+sequence`` become ``Dim.DYNAMIC`` and
    let torch.export infer the relation.
    """
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        return dims.setdefault(name, Dim(name)) if name.isidentifier() else Dim.DYNAMIC

    specs = [{i: dim(n) for i, n in t.dynamic_axes().items()} or None for t in signature.inputs]
    params = inspect.signature(module.forward).parameters
    bound = inspect.signature(module.forward).bind(*args)
    out, i = [], 0
    for pname, value in bound.arguments.items():
        if params[pname].kind is inspect.Parameter.VAR_POSITIONAL:  # forward(self, a, *kv)
            out.append(tuple(specs[i : i + len(value)]))
            i += len(value)
        else:
            out.append(specs[i])
            i += 1
    return tuple(out)


def _export_dynamo(module, args, signature, path: Path, opset: int) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=opset,
        input_names=signature.input_names(),
        output_names=signature.output_names(),
        dynamic_shapes=_dynamic_shapes(module, signature, args),
        verbose=False,
        optimize=True,
    )


def _export_torchscript(module, args, signature, path: Path, opset: int) -> None:
    axes = {t.name: t.dynamic_axes() for t in (*signature.inputs, *signature.outputs)}
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=signature.input_names(),
        output_names=signature.output_names(),
        dynamic_axes={k: v for k, v in axes.items() if v},
        do_constant_folding=True,
    )


def name_dynamic_axes(path: Path, signature: ExportSignature) -> None:
    """Rename the graph's symbolic dims to the signature's axis names, everywhere they occur.

    Raises ValueError if the exporter fixed an axis the signature declares dynamic.
    """
    model = onnx.load(str(path))
    graph = model.graph
    specs = {t.name: t for t in (*signature.inputs, *signature.outputs)}
    rename: dict[str, str] = {}
    for value in (*graph.input, *graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, want in spec.dynamic_axes().items():
            if axis >= len(dims):
                continue  # a rank mismatch is the shape check's to report
            if dims[axis].HasField("dim_value"):
                raise ValueError(
                    f"axis {axis} ({want!r}) of {value.name!r} was fixed to "
                    f"{dims[axis].dim_value} by the exporter"
                )
            if dims[axis].dim_param:
                rename.setdefault(dims[axis].dim_param, want)
            dims[axis].dim_param = want
    for value in graph.value_info:  # keep intermediate shapes consistent with the new names
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    onnx.save(model, str(path))


def trace(
    module: torch.nn.Module,
    signature: ExportSignature,
    example: dict[str, np.ndarray],
    path: Path,
    opset: int,
) -> dict[str, Any]:
    """Export ``module`` to ``path`` with named dynamic axes; return how it was exported.

    ``$ENGINE_ONNX_EXPORTER`` picks one exporter; by default dynamo is tried first.
    """
    args = tuple(
        torch.from_numpy(np.ascontiguousarray(example[n])) for n in signature.input_names()
    )
    attempts: dict[str, str] = {}
    choice = os.environ.get(EXPORTER_ENV, "auto").strip().lower() or "auto"
    methods = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
    if choice != "auto" and choice not in methods:
        raise TraceFailed(f"{EXPORTER_ENV}={choice!r}: use auto, dynamo or torchscript")
    for method, fn in methods.items():
        if choice not in ("auto", method):
            continue
        try:
            # the exporters print progress and warnings of their own; ours is the display
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                quiet_exporter_logs(),
            ):
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    fn(module, args, signature, path, opset)
            name_dynamic_axes(path, signature)
            return {"exporter": method, "opset": opset, "failed_attempts": attempts}
        except Exception as exc:  # try the next exporter, keep why this one failed
            attempts[method] = _short(exc)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise TraceFailed(
        f"could not export {type(module).__name__} to ONNX: "
        + "; ".join(f"{k}: {v}" for k, v in attempts.items())
    )


def count_nodes(path: Path) -> int:
    """Number of nodes in the main graph of an ONNX file."""
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def optimize(path: Path, share_transposed: bool = True) -> dict[str, Any]:
    """Run onnxruntime's basic (provider-independent) graph pass; keep it if it removed nodes.

    Basic level only folds constants and drops redundant nodes, so the result still holds
    standard ONNX ops only: loadable by any onnxruntime build and by TensorRT's parser. Then a
    weight stored with its transpose is kept once (:func:`share_transposed_weights`), unless
    ``share_transposed`` is off: int8 shares a tied table with the head's 8-bit weights itself
    (``exporters.quantize.quantize_gathers``), which needs the fp32 Gather table to find it.
    """
    import onnxruntime as ort

    out = path.with_name(path.stem + ".opt.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    options.intra_op_num_threads = 1
    # the session only writes the optimized graph and never runs: prepacking MatMul weights
    # would copy them for nothing (measured: peak 1,480 -> 1,008 MiB on a 474 MiB GPT-2 small
    # graph; the written graph is byte-identical)
    options.add_session_config_entry("session.disable_prepacking", "1")
    before = count_nodes(path)
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        after = count_nodes(out)
        applied = after < before
        if applied:
            os.replace(out, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    shared = share_transposed_weights(path) if share_transposed else []
    onnx.checker.check_model(str(path))
    return {
        "pass": "onnxruntime ORT_ENABLE_BASIC",
        "nodes_before": before,
        "nodes_after": after,
        "applied": applied,
        "shared_transposed_weights": shared,
    }


def share_transposed_weights(path: Path, min_elements: int = 4096) -> list[str]:
    """Keep one copy of a matrix stored both as itself and as its transpose; return their names.

    A tied embedding (GPT-2's token embedding is also its output head) reaches the graph as a
    ``Gather`` table of shape (V, C) and, constant-folded for the head's ``MatMul``, a (C, V)
    transpose of it: the same numbers twice (154 MB twice at GPT-2 small's 50257 x 768). The
    (C, V) copy is dropped and its users read a ``Transpose`` of the table instead, which
    onnxruntime folds back into a constant when it loads the graph (and the ``MatMul``
    prepacks it as before): the file holds the table once, and both the lookup and the head
    run as they would on two copies. (Gathering the head's columns instead, along axis 1,
    cost 330 us a decode step at batch 16: one strided element at a time.)
    """
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    big = {
        t.name: t for t in graph.initializer if len(t.dims) == 2 and np.prod(t.dims) >= min_elements
    }
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, t in big.items():
        by_shape.setdefault(tuple(t.dims), []).append(name)
    tables = {
        node.input[0]
        for node in graph.node
        if node.op_type == "Gather"
        and node.input
        and node.input[0] in big
        and next((a.i for a in node.attribute if a.name == "axis"), 0) == 0
    }
    rewritten: list[str] = []
    for table in sorted(tables):
        dims = tuple(big[table].dims)
        values = numpy_helper.to_array(big[table])
        twin = next(
            (n for n in by_shape.get(dims[::-1], []) if n != table and n not in tables
             and np.array_equal(numpy_helper.to_array(big[n]), values.T)),
            None,
        )  # fmt: skip
        if twin is None:
            continue
        transposed = f"{twin}__from_{table}"
        users = [node for node in graph.node if twin in node.input]
        for node in users:
            node.input[:] = [transposed if name == twin else name for name in node.input]
        first = min(list(graph.node).index(node) for node in users) if users else 0
        transpose = helper.make_node(
            "Transpose", [table], [transposed], name=transposed, perm=[1, 0]
        )
        graph.node.insert(first, transpose)
        graph.initializer.remove(big.pop(twin))
        by_shape[dims[::-1]].remove(twin)
        rewritten.append(f"{twin} -> Transpose({table})")
    if rewritten:
        onnx.save(model, str(path))
    return rewritten


def to_fp16(path: Path) -> dict[str, Any]:
    """Convert the graph's float weights and ops to fp16, keeping fp32 inputs/outputs.

    Ops in :data:`FP16_KEEP_FP32` stay fp32 (with casts around them) for stable numerics.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    before = path.stat().st_size
    blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns for every constant it clamps to fp16 range
        # given the path, shape inference runs file to file (infer_shapes_path) and only the
        # inferred model is loaded: given a loaded model, it serialized and re-parsed the
        # whole graph beside it (1.8 GiB over the fp32 weights at GPT-2 small, not 0.9)
        half = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=blocked)
    _sort_topologically(half.graph)  # the converter appends its input casts at the end
    kept = sorted({n.op_type for n in half.graph.node if n.op_type in FP16_KEEP_FP32})
    onnx.save(half, str(path))
    del half
    onnx.checker.check_model(str(path))
    return {
        "converter": "onnxruntime.transformers.float16",
        "keep_io_types": True,
        "ops_kept_fp32": kept,
        "bytes_fp32": before,
        "bytes_fp16": path.stat().st_size,
    }


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node follows the nodes producing its inputs (stable)."""
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [
        {producer[x] for x in n.input if x in producer and producer[x] != i}
        for i, n in enumerate(nodes)
    ]
    order, done = [], [False] * len(nodes)
    for start in range(len(nodes)):  # iterative DFS from each node in original order
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if done[i]:
                continue
            if expanded:
                done[i] = True
                order.append(i)
                continue
            stack.append((i, True))
            stack.extend((d, False) for d in sorted(deps[i], reverse=True) if not done[d])
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Describe the graph's inputs and outputs: name, numpy dtype name, shape with axis names."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        t = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        ]
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {
        "inputs": [describe(v) for v in model.graph.input],
        "outputs": [describe(v) for v in model.graph.output],
    }
