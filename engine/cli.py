"""The ``engine`` command line. Every user-facing failure becomes a message and exit code 2."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine import cli_runtime
from engine import sampling_defaults as defaults
from engine.cli_help import App
from engine.errors import EngineError
from engine.extras import needs

app = App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train small models in PyTorch, export them to ONNX/TensorRT, serve them over gRPC.",
)
# piped output (scripts, tests) gets full-width tables instead of truncated names
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option("--config", "-c", help="Override a config field: key=value (repeatable)."),
]


@app.command("plugins")
@needs("train", "`engine plugins`")
def plugins_cmd() -> None:
    """List every registered architecture and export format with the plugin that provides it."""
    from engine.plugins import architectures, export_formats, get_plugin_manager, plugin_info

    pm = get_plugin_manager()
    table = Table(title="Architectures")
    for col in ("architecture", "task", "plugin", "version", "source"):
        table.add_column(col, no_wrap=True)  # names must stay greppable whatever the width
    table.add_column("description")
    for name, (arch, info) in architectures(pm).items():
        table.add_row(name, arch.task, info.name, info.version, info.source, arch.description)
    console.print(table)
    formats = Table(title="Export formats")
    for col in ("format", "plugin", "source"):
        formats.add_column(col, no_wrap=True)
    for impl in pm.hook.engine_register_export_formats.get_hookimpls():
        info = plugin_info(pm, impl.plugin)
        for fmt in impl.function() or []:
            formats.add_row(fmt.name, info.name, info.source)
    if export_formats(pm):
        console.print(formats)


@app.command("train")
@needs("train", "`engine train`")
def train_cmd(
    arch: Annotated[str, typer.Argument(help="Architecture name (see `engine plugins`).")],
    out: Annotated[Path | None, typer.Option(help="Checkpoint directory [runs/ARCH].")] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Training steps [config default].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    config: ConfigOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    checkpoint_every: Annotated[
        int | None, typer.Option(min=1, help="Also write a checkpoint every N steps.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from a checkpoint's or a Hugging Face directory's weights (fine-tune).",
            metavar="CHECKPOINT|HF_DIR",
        ),
    ] = None,
) -> None:
    """Train an architecture, evaluate it against its quality bar and write a checkpoint."""
    import contextlib
    import json

    from engine.configs import parse_overrides
    from engine.plugins import get_architecture
    from engine.trainer import train

    out = out or Path("runs") / arch
    with contextlib.ExitStack() as stack:
        source = None
        if init is not None:  # the CLI composes: exporters reads the source, the trainer trains
            from exporters.source import open_source

            source = stack.enter_context(open_source(Path(init)))
        architecture, _ = get_architecture(source.arch.name if source else arch)
        overrides = parse_overrides(architecture.config_class, config or [])
        path = train(
            arch,
            out,
            steps=steps,
            seed=seed,
            device=device,
            overrides=overrides,
            resume=resume,
            progress=progress,
            checkpoint_every=checkpoint_every,
            init=source,
        )
    metrics_path = path / "metrics.json"
    if os.environ.get("RANK", "0") == "0" and metrics_path.exists():  # rank 0 reports
        metrics = json.loads(metrics_path.read_text())
        quality = metrics.get("quality", {})
        mark = "[green]PASS[/green]" if quality.get("passed") else "[yellow]below bar[/yellow]"
        console.print(f"{mark} {quality.get('summary', '')}")
        console.print(f"checkpoint: {path}")


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise EngineError(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


@app.command("sample")
@needs("train", "`engine sample`")
def sample_cmd(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    prompt: Annotated[str | None, typer.Option(help="Prompt for a generative model.")] = None,
    text: Annotated[str | None, typer.Option(help="Text to classify.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (image grids).")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = defaults.MAX_TOKENS,
    temperature: Annotated[float, typer.Option(min=0.0)] = defaults.TEMPERATURE,
    top_k: Annotated[int, typer.Option(min=0)] = defaults.TOP_K,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = defaults.TOP_P,
    seed: Annotated[int, typer.Option()] = 0,
    option: Annotated[list[str] | None, typer.Option(help="Extra key=value.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
) -> None:
    """Run a trained checkpoint (or a Hugging Face directory) once in PyTorch; show the result."""
    import torch

    from engine.trainer import resolve_device
    from exporters.source import open_source

    dev = resolve_device(device)
    options: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
        **_parse_options(option),
    }
    for key, value in (("prompt", prompt), ("text", text), ("out", out)):
        if value is not None:
            options[key] = value
    with open_source(Path(checkpoint_dir)) as source, torch.no_grad():
        model = source.model.to(dev)
        text = source.arch.sample(model, source.artifacts_dir, source.config, options)
        console.print(text, markup=False)


@app.command("export")
@needs("train", "`engine export`")
def export_cmd(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    repo: Annotated[Path, typer.Option(help="Model repository directory.")],
    name: Annotated[str | None, typer.Option(help="Model name [architecture].")] = None,
    format: Annotated[str, typer.Option("--format", help="onnx, tensorrt or torch.")] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision graph (for GPUs).")] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="8-bit weights (CPUs), checked on held-out data.")
    ] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset.")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch (TensorRT).")] = 16,
    max_seq: Annotated[int | None, typer.Option(min=1, help="Longest sequence.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite the latest version.")] = False,
    validate: Annotated[bool, typer.Option(help="Validate against PyTorch.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """Export a checkpoint into a versioned model repository, validated against PyTorch."""
    from engine.plugins import export_formats
    from exporters.base import ExportOptions

    formats = export_formats()
    if format not in formats:
        raise EngineError(f"unknown format {format!r}; known: {', '.join(sorted(formats))}")
    options = ExportOptions(
        name=name,
        fp16=fp16,
        int8=int8,
        opset=opset,
        max_batch=max_batch,
        max_seq=max_seq,
        force=force,
        validate=validate,
        progress=progress,
    )
    version_dir = formats[format].export(Path(checkpoint_dir), Path(repo), options)
    console.print(f"exported: {version_dir}")


@app.command("convert")
@needs("train", "`engine convert`")
def convert_cmd(
    checkpoint_dir: Annotated[Path, typer.Argument(metavar="CHECKPOINT")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR")],
    to: Annotated[str, typer.Option("--to", help="Target format: hf (Hugging Face).")],
    force: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
) -> None:
    """Write a checkpoint as a Hugging Face directory that transformers loads (checked)."""
    if to != "hf":
        raise EngineError(f"--to {to!r}: the only target is hf (a Hugging Face directory)")
    from exporters.hf.convert import convert_to_hf

    report = convert_to_hf(Path(checkpoint_dir), Path(out_dir), force=force)
    checked = (
        f"greedy tokens identical on {report['prompts']} prompts"
        if "prompts" in report
        else f"labels identical, logits within {report['max_abs_logit_diff']:.1g} on "
        f"{report['texts']} texts"
    )
    console.print(
        f"converted: {report['path']} ({report['class']}; reloaded by transformers: {checked})"
    )


cli_runtime.register(app)
DtypeOpt, CudaGraphsOpt = cli_runtime.DtypeOpt, cli_runtime.CudaGraphsOpt


@app.command("serve")
def serve_cmd(
    repo: Annotated[Path, typer.Option(help="Model repository directory.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated models [all].")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 50051,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="Prometheus port.")] = 9090,
    no_metrics: Annotated[bool, typer.Option("--no-metrics", help="No metrics endpoint.")] = False,
    auth_token_file: Annotated[Path | None, typer.Option(help="Require this bearer token.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or tensorrt.")] = "cpu",
    backend: Annotated[str | None, typer.Option(help="Backend name [by device].")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads.")] = None,
    spin: Annotated[
        bool, typer.Option(help="onnxruntime threads spin between ops (lower latency, busy cores).")
    ] = True,
    no_dynamic_batching: Annotated[
        bool,
        typer.Option("--no-dynamic-batching", help="Classifier/GAN: one request per call."),
    ] = False,
    max_queue_delay_ms: Annotated[
        float | None,
        typer.Option(min=0.0, help="Classifier/GAN: how long a request may wait for a batch [0]."),
    ] = None,
    max_num_seqs: Annotated[
        int, typer.Option(min=1, help="LM: most sequences decoded together.")
    ] = 16,
    kv_cache_bytes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="LM: KV-cache budget in bytes; sequences hold 16-token blocks of it "
            "[max-num-seqs full contexts].",
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="LM on CUDA: KV budget as a fraction of the free GPU memory."
        ),
    ] = None,
    dtype: DtypeOpt = None,
    cuda_graphs: CudaGraphsOpt = True,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="LM: reuse computed KV blocks for prompts that start the same way.",
        ),
    ] = True,
    max_model_len: Annotated[
        int | None,
        typer.Option(min=1, help="LM: longest prompt + output served [the model's context]."),
    ] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to drain on SIGTERM.")] = 30.0,
    max_running: Annotated[int, typer.Option(min=1, help="Requests in flight per model.")] = 64,
    max_waiting: Annotated[int, typer.Option(min=0, help="Queued requests per model.")] = 256,
    max_message_mb: Annotated[float, typer.Option(min=0.001, help="Largest request.")] = 4.0,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING.")] = "INFO",
    version_policy: Annotated[
        str, typer.Option(help="Versions served per model: latest:N, specific:1,3 or all.")
    ] = "latest:1",
    ray: Annotated[
        bool, typer.Option("--ray", help="Run replicas behind Ray Serve's gRPC ingress.")
    ] = False,
    replicas: Annotated[int, typer.Option(min=1, help="With --ray: runtime replicas.")] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="With --ray: a cluster to join [start a local one].")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Append the JSON log to this file [stderr].")
    ] = None,
) -> None:
    """Serve every model of a repository over gRPC (engine.v1 + KServe v2) until SIGTERM."""
    from engine.server.cli_commands import serve

    serve(
        repo,
        models=models,
        host=host,
        port=port,
        metrics_port=None if no_metrics else metrics_port,
        auth_token_file=auth_token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        device=device,
        backend=backend,
        threads=threads,
        spin=spin,
        dynamic_batching=not no_dynamic_batching,
        max_queue_delay_ms=max_queue_delay_ms,
        max_num_seqs=max_num_seqs,
        kv_cache_bytes=kv_cache_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        dtype=dtype,
        cuda_graphs=cuda_graphs,
        prefix_caching=prefix_caching,
        max_model_len=max_model_len,
        grace=grace,
        max_running=max_running,
        max_waiting=max_waiting,
        max_message_mb=max_message_mb,
        log_level=log_level,
        version_policy=version_policy,
        ray=ray,
        replicas=replicas,
        ray_address=ray_address,
        log_file=log_file,
    )


def _mount_bench() -> None:
    # bench.cli imports only typer at module level: the bench's own imports wait for its commands
    from bench.cli import bench_app

    app.add_typer(bench_app, name="bench")


_mount_bench()

client_app = App(no_args_is_help=True, help="Call a running `engine serve`.")
app.add_typer(client_app, name="client")

# How every client command reaches its server: declared once, added to each command's options
# by @connection_options and handed to it as one Connection.
CONNECTION_OPTIONS = (
    ("target", Annotated[str, typer.Option(help="Server address host:port.")], "127.0.0.1:50051"),
    (
        "token",
        Annotated[
            str | None,
            typer.Option(envvar="ENGINE_AUTH_TOKEN", help="Bearer token.", show_default=False),
        ],
        None,
    ),
    (
        "auth_token_file",
        Annotated[Path | None, typer.Option("--auth-token-file", help="File with the token.")],
        None,
    ),
    ("tls", Annotated[bool, typer.Option(help="Use TLS.")], False),
    ("tls_ca", Annotated[Path | None, typer.Option(help="CA certificate to trust (PEM).")], None),
    ("timeout", Annotated[float | None, typer.Option(help="Deadline in seconds.")], None),
    (
        "wait",
        Annotated[
            float,
            typer.Option(min=0.0, help="Wait up to this many seconds for the server to come up."),
        ],
        0.0,
    ),
)


def connection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command(..., conn)`` the options of :data:`CONNECTION_OPTIONS` instead of ``conn``."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "conn"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
        for name, kind, default in CONNECTION_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.server.cli_commands import Connection

        values = {name: kwargs.pop(name) for name, _, _ in CONNECTION_OPTIONS}
        values["token_file"] = values.pop("auth_token_file")
        return command(*args, conn=Connection(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
    return wrapper


def _server_default(what: str, value: object = None) -> str:
    """Help text for a sampling option the client leaves to the server when not given."""
    return f"{what} [server default{f': {value}' if value is not None else ''}]"


@client_app.command("generate")
@connection_options
def client_generate_cmd(
    model: str,
    prompt: str,
    max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help=_server_default("Tokens at most.", defaults.MAX_TOKENS)),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(min=0.0, help=_server_default("0 = greedy.", defaults.TEMPERATURE)),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(min=0, help=_server_default("0 = off.", defaults.TOP_K))
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help=_server_default("Nucleus mass.", defaults.TOP_P)),
    ] = None,
    min_p: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help=_server_default("Min-p.", 0.0))
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(min=0.0, help=_server_default("> 1 discourages repeats.", 1.0))
    ] = None,
    presence_penalty: Annotated[
        float | None, typer.Option(min=-2.0, max=2.0, help=_server_default("OpenAI's.", 0.0))
    ] = None,
    frequency_penalty: Annotated[
        float | None, typer.Option(min=-2.0, max=2.0, help=_server_default("OpenAI's.", 0.0))
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help=_server_default("Random."))] = None,
    logprobs: Annotated[
        int | None, typer.Option(min=0, max=20, help="Print each token's logprob and top N.")
    ] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    stop_token_id: Annotated[
        list[int] | None, typer.Option(help="Stop token id (repeatable).")
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Generate past end-of-text.")
    ] = False,
    *,
    conn: Any,
) -> None:
    """Stream a completion from a served language model to the terminal."""
    from engine.server.cli_commands import client_generate

    client_generate(
        conn,
        model,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
        logprobs=logprobs,
        stop=stop or (),
        stop_token_ids=stop_token_id or (),
        ignore_eos=ignore_eos,
    )


@client_app.command("classify")
@connection_options
def client_classify_cmd(model: str, texts: list[str], *, conn: Any) -> None:
    """Classify texts with a served classifier; prints label, probability, text."""
    from engine.server.cli_commands import client_classify

    client_classify(conn, model, texts)


@client_app.command("sample-images")
@connection_options
def client_sample_images_cmd(
    model: str,
    digits: list[int],
    seed: Annotated[int | None, typer.Option()] = None,
    out_dir: Annotated[
        Path, typer.Option(help="Where the PNGs go [current directory].", show_default=False)
    ] = Path("."),
    *,
    conn: Any,
) -> None:
    """Generate digit images with a served GAN and write one PNG per digit."""
    from engine.server.cli_commands import client_sample_images

    client_sample_images(conn, model, digits, seed=seed, out_dir=out_dir)


@client_app.command("models")
@connection_options
def client_models_cmd(*, conn: Any) -> None:
    """List the models a server serves."""
    from engine.server.cli_commands import client_models

    client_models(conn)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; turn every EngineError into a one-line message and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except EngineError as exc:
        # soft_wrap: the message stays one line whatever the terminal's width (greppable)
        message = f"[bold red]error:[/bold red] {escape(str(exc))}"
        err_console.print(message, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
