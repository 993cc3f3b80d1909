"""``engine export --format onnx``: a loaded model -> validated ONNX graphs -> a repository version.

Generic over architectures: the variants, their signatures, wrapped modules, example inputs and
serving metadata all come from the Architecture. Stages: load, trace, optimize, (fp16), validate,
(engine build), write. Everything is written into a staged directory that is renamed into
``REPO/NAME/<version>`` only at the end, so a failure or Ctrl-C leaves the repository untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

from engine.errors import EngineError
from engine.repository import Manifest, staged_version, write_manifest
from exporters.base import (
    ExportError,
    ExportOptions,
    check_contract,
    check_serving_keys,
    copy_artifact,
)
from exporters.memory import release_memory
from exporters.onnx_graph import DEFAULT_OPSET, graph_io, optimize, to_fp16, trace
from exporters.progress import Stages
from exporters.provenance import (
    context_length,
    library_versions,
    manifest_header,
)
from exporters.quantize import quantize_graph
from exporters.source import ModelSource

MAIN_FILE = "model.onnx"
# Example sizes for tracing: distinct and >= 2 so torch.export keeps every axis symbolic.
TRACE_SIZES = {"batch": 2, "seq": 3, "past": 5}
QUANTIZED_TASKS = ("generate", "classify")  # tasks with held-out accuracy floors
INT8_NOTE = (
    "int8: weight-only 8-bit MatMulNBits (onnxruntime's MatMulNBitsQuantizer), embedding lookups "
    "as GatherBlockQuantized sharing the tied output head's weights; activations are quantized "
    "per row inside the kernel, so a request's output does not depend on its batch. For CPUs."
)
FP16_NOTE = (
    "fp16 halves the file size and is meant for GPUs (CUDA / TensorRT execution). On CPU, "
    "onnxruntime runs it no faster and often slower than fp32: it has few fp16 kernels and "
    "casts around the rest."
)


class PostBuild(Protocol):
    """A step after ONNX validation that adds files to the version (e.g. TensorRT engines)."""

    name: str

    def build(
        self,
        version_tmp: Path,
        graphs: dict[str, dict[str, Any]],
        arch: Any,
        config: Any,
        options: ExportOptions,
        max_seq: int | None,
        stages: Stages,
        model_dir: Path,
    ) -> dict[str, Any]:
        """Write extra files into ``version_tmp``; return the manifest section describing them."""

    def commit(self) -> None:
        """Write anything kept outside the version directory, once the version is in place."""


def export_checkpoint(
    ckpt_dir: Path,
    repo: Path,
    options: ExportOptions,
    fmt: str = "onnx",
    post: PostBuild | None = None,
) -> Path:
    """Load a checkpoint or a Hugging Face directory and export it; return the version dir."""
    from exporters.source import open_source

    with Stages(options.progress) as stages, contextlib.ExitStack() as stack:
        with stages.stage("load model"):
            source = stack.enter_context(open_source(Path(ckpt_dir)))
        return export_source(source, Path(repo), options, fmt=fmt, post=post, stages=stages)


def export_model(
    arch: Any,
    config: Any,
    model: Any,
    ckpt_dir: Path,
    repo: Path,
    name: str,
    options: ExportOptions,
    *,
    fmt: str = "onnx",
    post: PostBuild | None = None,
    plugin: dict[str, Any] | None = None,
    checkpoint: dict[str, Any] | None = None,
    stages: Stages | None = None,
) -> Path:
    """Export an in-memory model as a new version of ``repo/name``; return the version dir.

    ``ckpt_dir`` holds the artifacts the architecture reads (its tokenizer, labels).
    """
    source = ModelSource(arch, config, model, Path(ckpt_dir), plugin or {}, checkpoint or {}, name)
    options = replace(options, name=name)
    return export_source(source, Path(repo), options, fmt=fmt, post=post, stages=stages)


def export_source(
    source: ModelSource,
    repo: Path,
    options: ExportOptions,
    *,
    fmt: str = "onnx",
    post: PostBuild | None = None,
    stages: Stages | None = None,
) -> Path:
    """Export a loaded source as a new version of ``repo/<options.name or source.name>``.

    The one path every source takes (checkpoint or Hugging Face directory); returns the version
    directory. Nothing is left in ``repo`` when it fails.
    """
    if stages is None:
        with Stages(options.progress) as own:
            return export_source(source, repo, options, fmt=fmt, post=post, stages=own)
    import torch

    if options.validate and source.reference is not None:
        source.reference.require()  # a missing transformers fails before minutes of tracing
    threads = torch.get_num_threads()
    # Export and validation run many small ops; on a busy machine torch's spinning intra-op
    # threads made a 2-layer model's decode step 200 ms instead of 1 ms. One thread is faster.
    torch.set_num_threads(1)
    try:
        return _export(source, Path(repo), options, fmt, post, stages)
    finally:
        torch.set_num_threads(threads)


def _export(
    source: ModelSource,
    repo: Path,
    options: ExportOptions,
    fmt: str,
    post: PostBuild | None,
    stages: Stages,
) -> Path:
    from exporters.validate import validate_export

    arch, config, model, ckpt_dir = source.arch, source.config, source.model, source.artifacts_dir
    name = options.name or source.name
    _check_precision(arch, options, post)
    opset = options.opset or DEFAULT_OPSET
    serving = arch.serving_metadata(config, ckpt_dir)
    check_serving_keys(arch, serving, fmt)
    max_seq = options.max_seq or context_length(serving)
    model.eval()
    with staged_version(repo, name, options.force) as (tmp, version):
        for src in arch.artifact_files(ckpt_dir):  # first: a missing tokenizer fails fast
            copy_artifact(Path(src), tmp)
        graphs: dict[str, dict[str, Any]] = {}
        for i, variant in enumerate(arch.export_variants(config)):
            file = MAIN_FILE if i == 0 else f"{variant}.onnx"
            signature = arch.export_signature(config, variant)
            with stages.stage(f"trace {variant}"):
                module = arch.export_module(model, config, variant).eval()
                example = arch.example_inputs(config, variant=variant, **TRACE_SIZES)
                info = trace(module, signature, example, tmp / file, opset)
            release_memory()  # each stage's garbage goes back before the next stage allocates
            with stages.stage(f"optimize {variant}"), _graph_step("optimize", variant):
                info["optimization"] = optimize(tmp / file, share_transposed=not options.int8)
            release_memory()
            if options.fp16:
                with stages.stage(f"fp16 {variant}"), _graph_step("convert to fp16", variant):
                    info["fp16"] = to_fp16(tmp / file)
                release_memory()
            if options.int8:
                with stages.stage(f"int8 {variant}"), _graph_step("quantize to int8", variant):
                    info["int8"] = quantize_graph(tmp / file)
                release_memory()
            tolerance = {
                k: getattr(signature, k) for k in ("atol", "rtol", "fp16_atol", "fp16_rtol")
            }
            graphs[variant] = {"file": file, **info, **graph_io(tmp / file), "tolerance": tolerance}
        if options.validate:
            paths = {variant: tmp / g["file"] for variant, g in graphs.items()}
            validation = validate_export(
                arch,
                config,
                model,
                ckpt_dir,
                paths,
                fp16=options.fp16,
                stages=stages,
                reference=source.reference,
                int8=options.int8,
            )
        else:
            validation = {"validated": False, "reason": "skipped with --no-validate"}
        built = {}
        if post is not None:
            built[post.name] = post.build(
                tmp, graphs, arch, config, options, max_seq, stages, Path(repo) / name
            )
        with stages.stage("write"):
            libraries = library_versions(*(["tensorrt"] if post is not None else []))
            header = manifest_header(
                name, version, fmt, arch, source.plugin, source.provenance, libraries
            )
            manifest = Manifest(
                **header,
                precision=precision(options),
                export_options=asdict(options),
                max_seq=max_seq,
                main_graph=next(iter(graphs)),
                graphs=graphs,
                serving=serving,
                validation=validation,
                sections={
                    "opset": opset,
                    "precision_note": {"fp16": FP16_NOTE, "int8": INT8_NOTE}.get(
                        precision(options)
                    ),
                    **built,
                    "timings_s": dict(stages.seconds),
                },
            )
            check_contract(manifest, tmp)
            write_manifest(tmp, manifest)
    if post is not None:
        post.commit()
    return Path(repo) / name / str(version)


def precision(options: ExportOptions) -> str:
    """The weight precision an export writes: fp32, fp16 or int8."""
    return "int8" if options.int8 else "fp16" if options.fp16 else "fp32"


def _check_precision(arch: Any, options: ExportOptions, post: PostBuild | None) -> None:
    """Refuse what int8 cannot do before any tracing: fail fast, write nothing."""
    if not options.int8:
        return
    if options.fp16:
        raise ExportError("--int8 and --fp16 exclude each other: pick one precision")
    if post is not None:
        raise ExportError(
            f"--int8 is for onnxruntime on CPUs; {post.name} cannot build from MatMulNBits graphs"
        )
    if arch.task not in QUANTIZED_TASKS:
        raise ExportError(
            f"--int8 is checked for {' and '.join(QUANTIZED_TASKS)} models only; {arch.name} "
            f"is a {arch.task} model: export it in fp32"
        )


@contextlib.contextmanager
def _graph_step(what: str, variant: str) -> Iterator[None]:
    """Turn a library failure on a traced graph into an ExportError that names the step."""
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:
        raise ExportError(
            f"could not {what} graph {variant!r}: {type(exc).__name__}: {exc}"
        ) from exc
