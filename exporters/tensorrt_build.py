"""Serialized TensorRT engines built from the validated ONNX export (``--format tensorrt``).

One engine per graph variant (``model.plan`` for the main one), with one optimization profile
whose min/opt/max shapes come from ``--max-batch``/``--max-seq`` (:func:`profile_shapes`, a
pure function of the signature). fp16 uses a strongly typed network built from the fp16 ONNX
graph where TensorRT has one (10+), else the FP16 builder flag; fp32 turns TensorRT's default
TF32 off, so an fp32 engine is held to fp32 tolerances. The timing cache is kept per model at
``REPO/NAME/timing.cache`` so rebuilds skip kernel timing.

Validation runs every engine against its ONNX graph (onnxruntime) on example inputs, at the
signature's fp32 or fp16 tolerance, and, for a ``generate`` model, decodes greedy tokens through
the engine's KV cache: identical to onnxruntime's in fp32, teacher-forced top-1 agreement in
fp16 (the ONNX export's own bar, :data:`exporters.base.FP16_MIN_TOP1`).

Written against the TensorRT 10 Python API. Where ``tensorrt`` or a CUDA GPU is missing,
:func:`require_tensorrt` raises TensorRTUnavailable before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.architecture import ExportSignature
from exporters.base import (
    AgreementTooLow,
    TensorRTBuildFailed,
    TensorRTUnavailable,
    ValuesMismatch,
    greedy_agreement,
    require_identical_greedy,
)

INSTALL_HINT = (
    "on a machine with an NVIDIA GPU and driver, install the project's gpu extra "
    "(tensorrt>=10, onnxruntime-gpu) with pip install -e '.[gpu]', or export with --format onnx"
)
WORKSPACE_BYTES = 2 << 30  # builder scratch memory; small models need far less
Shape = tuple[int, ...]


def require_tensorrt() -> Any:
    """Return the ``tensorrt`` module if it imports and a CUDA GPU is visible, else raise."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError as exc:
        trt = None
        missing.append(f"the 'tensorrt' Python package is not installed ({exc})")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # torch is a hard dependency; be explicit anyway
        has_gpu = False
    if not has_gpu:
        missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise TensorRTUnavailable(
            "cannot build a TensorRT engine here: "
            + "; ".join(missing)
            + f". To fix: {INSTALL_HINT}"
        )
    return trt


def _axis_range(axis: str, batch: Shape, seq: Shape, cache: Shape, block: int = 16) -> Shape:
    """(min, opt, max) of one named dynamic axis, classified by its name.

    ``batch``; ``table_blocks`` is a row's blocks of ``block`` tokens (one context at most)
    and ``pool_blocks`` a paged pool's (``batch`` contexts); names with ``past``/``cache``
    are cache lengths (may be 0, prefill); names with ``total`` or ``a+b`` are sums of a cache
    and a sequence axis, so min/opt/max stay consistent with the inputs they are computed
    from; anything else is a sequence axis.
    """
    name = axis.replace(" ", "").lower()
    if "+" in name:
        parts = [_axis_range(p, batch, seq, cache, block) for p in name.split("+")]
        return tuple(int(sum(v)) for v in zip(*parts))
    if name == "batch":
        return batch
    if "block" in name:
        per_row = tuple(max(1, -(-s // block)) for s in seq)
        if "pool" in name:
            return tuple(b * r for b, r in zip(batch, per_row))
        return per_row
    if "total" in name:
        return tuple(c + s for c, s in zip(cache, seq))
    if "past" in name or "cache" in name:
        return cache
    return seq


def profile_shapes(
    signature: ExportSignature, max_batch: int, max_seq: int | None
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Map every input to its (min, opt, max) shapes for one TensorRT optimization profile.

    Batch runs 1..max_batch and sequences 1..max_seq, with opt at about half of each (a
    server's typical load); cache/past axes start at 0 so prefill (empty cache) is covered.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    needs_seq = any(isinstance(d, str) and d != "batch" for t in signature.inputs for d in t.shape)
    if needs_seq and (max_seq is None or max_seq < 1):
        raise ValueError("this graph has sequence axes: pass --max-seq (or a context length)")
    max_seq = max_seq or 1
    batch = (1, max(1, (max_batch + 1) // 2), max_batch)
    seq = (1, max(1, (max_seq + 1) // 2), max_seq)
    cache = (0, max_seq // 2, max_seq)
    # a paged KV pool (pool_blocks, heads, block_size, head_dim): its block size
    pools = [t.shape for t in signature.inputs if t.shape and t.shape[0] == "pool_blocks"]
    block = next((s[2] for s in pools if len(s) == 4 and isinstance(s[2], int)), 16)
    out = {}
    for spec in signature.inputs:
        ranges = [
            _axis_range(d, batch, seq, cache, block) if isinstance(d, str) else (d, d, d)
            for d in spec.shape
        ]
        out[spec.name] = tuple(tuple(int(r[k]) for r in ranges) for k in range(3))
    return out


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    signature: ExportSignature,
    *,
    max_batch: int,
    max_seq: int | None,
    fp16: bool,
    timing_cache: bytes = b"",
    workspace: int = WORKSPACE_BYTES,
) -> tuple[dict[str, Any], bytes]:
    """Build and write one engine; return (its manifest entry, the updated timing cache)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag_enum = trt.NetworkDefinitionCreationFlag
    strongly_typed = fp16 and hasattr(flag_enum, "STRONGLY_TYPED")
    flags = 0
    if hasattr(flag_enum, "EXPLICIT_BATCH"):  # required before TensorRT 10, a no-op after
        flags |= 1 << int(flag_enum.EXPLICIT_BATCH)
    if strongly_typed:  # layer precisions follow the fp16 ONNX graph's types exactly
        flags |= 1 << int(flag_enum.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildFailed(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    precision = "fp32"
    if fp16:
        precision = "fp16 (strongly typed network)"
        if not strongly_typed:
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise TensorRTBuildFailed(f"TensorRT {trt.__version__} offers no fp16 build mode")
            config.set_flag(trt.BuilderFlag.FP16)
            precision = "fp16 (BuilderFlag.FP16)"
    elif hasattr(trt.BuilderFlag, "TF32"):  # on by default: 10 mantissa bits in matmuls
        config.clear_flag(trt.BuilderFlag.TF32)
        precision = "fp32 (TF32 off)"
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(signature, max_batch, max_seq)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is skipped
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildFailed(
            f"TensorRT failed to build an engine from {onnx_path.name} (see its log above); "
            "try a smaller --max-batch/--max-seq"
        )
    plan_path.write_bytes(bytes(serialized))
    import torch

    entry = {
        "file": plan_path.name,
        "onnx": onnx_path.name,
        "precision": precision,
        "workspace_bytes": workspace,
        "device": torch.cuda.get_device_name(),
        "profile": {
            n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()
        },
    }
    return entry, bytes(config.get_timing_cache().serialize())


class EngineRunner:
    """Run a serialized engine on numpy inputs (torch CUDA tensors hold the device buffers)."""

    def __init__(self, plan: bytes):
        trt = require_tensorrt()
        self._trt = trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TensorRTBuildFailed("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep = []  # device buffers must outlive the launch

        def device_buffer(array: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            # TensorRT wants a non-null address even for an empty tensor (cache length 0)
            return t if t.numel() else torch.empty(1, dtype=t.dtype, device="cuda")

        for name in self.inputs:
            t = device_buffer(
                feeds[name].astype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
            )
            keep.append(t)
            self.context.set_input_shape(name, tuple(feeds[name].shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))
            t = device_buffer(np.empty(shape, dtype=dtype))
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
            outs[name] = (t, shape)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTBuildFailed("TensorRT engine execution failed")
        stream.synchronize()
        return {
            n: t.cpu().numpy().reshape(-1)[: int(np.prod(s))].reshape(s)
            for n, (t, s) in outs.items()
        }


def compare_with_onnx(
    plan: bytes,
    onnx_path: Path,
    arch: Any,
    config: Any,
    variant: str,
    max_batch: int,
    max_seq: int | None,
    fp16: bool,
) -> dict[str, Any]:
    """Run the engine and the ONNX graph (onnxruntime) on example inputs; bound the difference.

    An fp16 engine is held to the signature's fp16 tolerances, an fp32 one (TF32 off) to its
    fp32 tolerances.
    """
    from engine.graph_decoder import ort_runner
    from exporters.validate import ort_session

    signature = arch.export_signature(config, variant)
    atol, rtol = (
        (signature.fp16_atol, signature.fp16_rtol) if fp16 else (signature.atol, signature.rtol)
    )
    engine_run, onnx_run = EngineRunner(plan), ort_runner(ort_session(onnx_path))
    limit = max_seq or 8
    cases = [(1, 1, 0), (min(2, max_batch), min(3, limit), min(4, limit))]
    worst: dict[str, float] = {}
    for seed, (batch, seq, past) in enumerate(cases):
        feeds = arch.example_inputs(config, batch, seq, past, seed=seed, variant=variant)
        got, ref = engine_run(feeds), onnx_run(feeds)
        for name in signature.output_names():
            a, b = got[name].astype(np.float64), ref[name].astype(np.float64)
            err = float(np.abs(a - b).max()) if a.size else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
            if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
                raise ValuesMismatch(
                    f"TensorRT engine {variant!r}, output {name!r} (batch {batch}, seq {seq}, "
                    f"past {past}): shape {a.shape} vs {b.shape}, max abs diff {err:.3g} "
                    f"(tolerance atol {atol:g}, rtol {rtol:g}, {'fp16' if fp16 else 'fp32'})"
                )
    return {
        "cases": [dict(zip(("batch", "seq", "past"), c)) for c in cases],
        "tolerance": {"atol": atol, "rtol": rtol, "precision": "fp16" if fp16 else "fp32"},
        "max_abs_diff_vs_onnx": worst,
    }


def greedy_check(
    plan: bytes,
    onnx_path: Path,
    arch: Any,
    config: Any,
    variant: str,
    max_batch: int,
    max_seq: int | None,
    fp16: bool,
) -> dict[str, Any] | None:
    """Greedy tokens through the engine's KV cache against onnxruntime's; None unless generate.

    Prompts of uneven length, in batches the profile admits, each with as many new tokens as
    fit ``max_seq``. fp32: every token must equal onnxruntime's. fp16: two correct fp16
    kernels part at near ties, so the whole rows (prompt + onnxruntime's tokens) are scored
    teacher-forced and the engine's top-1 must agree at FP16_MIN_TOP1 of the positions.
    """
    if getattr(arch, "task", None) != "generate":
        return None
    from engine.graph_decoder import GraphDecoder, ort_runner
    from exporters.base import FP16_MIN_TOP1
    from exporters.validate import GREEDY_TOKENS, ort_session

    signature = arch.export_signature(config, variant)
    example = arch.example_inputs(config, 1, 1, 0, seed=0, variant=variant)
    decoder = GraphDecoder(signature, {k: v.shape for k, v in example.items()})
    engine_run, onnx_run = EngineRunner(plan), ort_runner(ort_session(onnx_path))
    limit = max_seq or 2 * GREEDY_TOKENS
    max_new = max(1, min(GREEDY_TOKENS, limit // 2))
    vocab = signature.outputs[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else int(config.vocab_size)
    rng = np.random.default_rng(0)
    longest = max(1, min(24, limit - max_new))
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, longest + 1, 8)]
    got, ref = [], []
    for i in range(0, len(prompts), max_batch):
        batch = prompts[i : i + max_batch]
        got.append(decoder.generate(engine_run, batch, max_new))
        ref.append(decoder.generate(onnx_run, batch, max_new))
    tokens, expected = np.concatenate(got), np.concatenate(ref)
    report: dict[str, Any] = {
        "prompts": len(prompts),
        "new_tokens": max_new,
        **greedy_agreement(tokens, expected),
    }
    if not fp16:
        what = f"TensorRT engine {variant!r} (fp32)"
        require_identical_greedy(tokens, expected, what, "TensorRT", "onnxruntime")
        return report
    agree, steps = 0, 0
    for i in range(0, len(prompts), max_batch):
        rows = [p + expected[i + j].tolist() for j, p in enumerate(prompts[i : i + max_batch])]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :], mask[j, width - len(r) :] = r, 1
        top = decoder.prefill_logits(onnx_run, ids, mask).argmax(-1)
        hit = decoder.prefill_logits(engine_run, ids, mask).argmax(-1) == top
        agree, steps = agree + int(hit[mask == 1].sum()), steps + int(mask.sum())
    report["teacher_forced_top1"] = agree / steps
    if agree / steps < FP16_MIN_TOP1:
        raise AgreementTooLow(
            f"TensorRT engine {variant!r} (fp16): teacher-forced top-1 agreement with "
            f"onnxruntime {agree / steps:.2%} is below {FP16_MIN_TOP1:.0%}; build it in fp32"
        )
    return report


class EngineBuilder:
    """The post-ONNX step of ``--format tensorrt``: one engine per variant plus the timing cache."""

    name = "tensorrt"

    def __init__(self) -> None:
        self._pending_cache: tuple[Path, bytes] | None = None

    def build(
        self,
        version_tmp: Path,
        graphs: dict[str, dict[str, Any]],
        arch: Any,
        config: Any,
        options: Any,
        max_seq: int | None,
        stages: Any,
        model_dir: Path,
    ) -> dict[str, Any]:
        """Build engines into ``version_tmp``; the timing cache is saved by :meth:`commit`."""
        from engine.repository import TIMING_CACHE

        cache_path = model_dir / TIMING_CACHE
        cache = cache_path.read_bytes() if cache_path.exists() else b""
        engines = {}
        for variant, graph in graphs.items():
            onnx_path = version_tmp / graph["file"]
            plan_path = onnx_path.with_suffix(".plan")
            with stages.stage(f"tensorrt build {variant}"):
                entry, cache = build_engine(
                    onnx_path,
                    plan_path,
                    arch.export_signature(config, variant),
                    max_batch=options.max_batch,
                    max_seq=max_seq,
                    fp16=options.fp16,
                    timing_cache=cache,
                )
            if options.validate:
                check = (arch, config, variant, options.max_batch, max_seq, options.fp16)
                plan = plan_path.read_bytes()
                with stages.stage(f"tensorrt validate {variant}"):
                    entry["validation"] = compare_with_onnx(plan, onnx_path, *check)
                    greedy = greedy_check(plan, onnx_path, *check)
                    if greedy is not None:
                        entry["validation"]["greedy"] = greedy
            engines[variant] = entry
        self._pending_cache = (cache_path, cache)
        import tensorrt as trt

        return {
            "version": trt.__version__,
            "max_batch": options.max_batch,
            "max_seq": max_seq,
            "timing_cache": f"../{TIMING_CACHE}",
            "engines": engines,
        }

    def commit(self) -> None:
        """Save the updated timing cache once the version directory is in place."""
        from engine.atomic import write_bytes

        if self._pending_cache is not None:
            write_bytes(*self._pending_cache)
