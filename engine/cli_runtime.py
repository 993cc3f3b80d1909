"""``engine generate|classify|sample-images``: the runtime in-process, without torch or gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from engine import sampling_defaults as defaults
from engine.errors import EngineError

RepoOpt = Annotated[Path, typer.Option(help="Model repository directory.")]
ModelOpt = Annotated[str | None, typer.Option(help="Model name [the only one].")]
VersionOpt = Annotated[int | None, typer.Option(min=1, help="Version [latest].")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or tensorrt.")]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="Intra-op threads.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option(help="LM, torch format: float16, bfloat16 or float32 [float16 on CUDA]."),
]
CudaGraphsOpt = Annotated[
    bool,
    typer.Option(help="LM, torch format on CUDA: replay decode steps as CUDA graphs (off: eager)."),
]


def register(app: typer.Typer) -> None:
    """Add the in-process runtime commands to ``app``."""
    app.command("generate")(generate_cmd)
    app.command("classify")(classify_cmd)
    app.command("sample-images")(sample_images_cmd)


def _open(repo: Path, model, version, device: str, threads, task: str, config=None):
    """Load a model version for ``task``; a model of another task is a clear error."""
    from engine.runtime import Engine

    eng = Engine.from_repository(
        repo, model, version, device=device, threads=threads, config=config
    )
    served = getattr(eng, "task", "generate")
    if served != task:
        eng.close()
        raise EngineError(f"model {model or ''} serves {served!r}, not {task}")
    return eng


def generate_cmd(
    prompt: str,
    repo: RepoOpt,
    model: ModelOpt = None,
    version: VersionOpt = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = defaults.MAX_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = defaults.TEMPERATURE,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = defaults.TOP_P,
    top_k: Annotated[int, typer.Option(min=0, help="0 = off.")] = defaults.TOP_K,
    seed: Annotated[int | None, typer.Option()] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    stream: Annotated[bool, typer.Option(help="Print text as it is generated.")] = True,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    cuda_graphs: CudaGraphsOpt = True,
) -> None:
    """Generate text from a prompt with the continuous-batching runtime."""
    from engine.runtime.llm_engine import EngineConfig
    from engine.runtime.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop or ()),
    )
    params.validate()
    config = EngineConfig(dtype=dtype, cuda_graphs=cuda_graphs)
    eng = _open(repo, model, version, device, threads, "generate", config)

    async def run() -> None:
        final = None
        async for out in eng.generate(prompt, params):
            if stream:
                typer.echo(out.delta_text, nl=False)
            final = out
        if not stream and final is not None:
            typer.echo(final.text, nl=False)
        typer.echo()
        if final is not None:
            u = final.usage
            typer.echo(
                f"[{final.finish_reason}; prompt {u.prompt_tokens} tokens, "
                f"completion {u.completion_tokens} tokens]",
                err=True,
            )

    try:
        asyncio.run(run())
    finally:
        eng.close()


def classify_cmd(
    texts: list[str],
    repo: RepoOpt,
    model: ModelOpt = None,
    version: VersionOpt = None,
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Classify texts; prints the top labels with their probabilities."""
    eng = _open(repo, model, version, device, threads, "classify")
    try:
        results = asyncio.run(eng.classify(texts, top_k=top_k))
    finally:
        eng.close()
    for text, res in zip(texts, results):
        top = ", ".join(f"{label} {p:.3f}" for label, p in res.top)
        typer.echo(f"{res.label}\t[{top}]\t{text[:60]}")


def sample_images_cmd(
    repo: RepoOpt,
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("digits.png"),
    digit: Annotated[list[int] | None, typer.Option(help="Digit(s) [0-9 all].")] = None,
    n: Annotated[int, typer.Option(min=1, max=100, help="Images per digit.")] = 10,
    seed: Annotated[int | None, typer.Option()] = None,
    model: ModelOpt = None,
    version: VersionOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Generate digit images with a conditional generator; writes a PNG grid (row = digit)."""
    from engine.atomic import write_bytes
    from engine.runtime.batched_engines import image_grid
    from engine.server.png import encode_png

    eng = _open(repo, model, version, device, threads, "sample_images")
    digits = digit or list(range(10))
    try:
        images = asyncio.run(eng.sample_images(digits, n=n, seed=seed))
    finally:
        eng.close()
    grid = image_grid(images, columns=n)  # uint8, so the 0..255 range maps back exactly
    write_bytes(out, encode_png(grid[None].astype(np.float32), 0.0, 255.0))
    typer.echo(f"wrote {out} ({len(digits)} rows x {n} images)")
