"""The ``engine serve`` and ``engine client ...`` commands as plain functions (typer wires them).

Each function takes the command's options as keyword arguments, prints for a person and
raises :class:`engine.errors.EngineError` (a one-line message, exit code 2) on failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engine.atomic import write_bytes
from engine.errors import EngineError


def _read_file(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read the {what} {path}: {exc}") from None


def serve(
    repo: Path,
    models: str | None = None,
    host: str = "127.0.0.1",
    port: int = 50051,
    metrics_port: int | None = 9090,
    auth_token_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    device: str = "cpu",
    backend: str | None = None,
    threads: int | None = None,
    spin: bool = True,
    dynamic_batching: bool = True,
    max_queue_delay_ms: float | None = None,
    max_num_seqs: int = 16,
    kv_cache_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    dtype: str | None = None,
    cuda_graphs: bool = True,
    prefix_caching: bool = True,
    max_model_len: int | None = None,
    grace: float = 30.0,
    max_running: int = 64,
    max_waiting: int = 256,
    max_message_mb: float = 4.0,
    log_level: str = "INFO",
    version_policy: str = "latest:1",
    ray: bool = False,
    replicas: int = 1,
    ray_address: str | None = None,
    log_file: Path | None = None,
) -> None:
    """Serve every model of ``repo`` (or the comma-separated ``models``) until SIGTERM/SIGINT.

    The JSON log goes to stderr, or is appended to ``log_file`` (so it never interleaves with a
    client's output in the same terminal).

    ``dynamic_batching=False`` runs every classify/sample_images request as its own backend call
    (batch size 1), the baseline dynamic batching is measured against.
    """
    from engine.client import read_token
    from engine.runtime.batcher import BatcherConfig
    from engine.runtime.llm_engine import EngineConfig
    from engine.server import logs
    from engine.server.app import EngineServer, ServerConfig
    from engine.server.lifecycle import ModelManager, VersionPolicy
    from engine.server.loader import open_served
    from engine.server.serving import Limits

    if bool(tls_cert) != bool(tls_key):
        raise EngineError("--tls-cert and --tls-key go together: give both or neither")
    names = [n.strip() for n in models.split(",") if n.strip()] if models else None
    config = ServerConfig(
        host=host,
        port=port,
        metrics_host=host,
        metrics_port=metrics_port,
        auth_token=read_token(token_file=auth_token_file) if auth_token_file else None,
        tls_cert=_read_file(tls_cert, "TLS certificate"),
        tls_key=_read_file(tls_key, "TLS key"),
        grace=grace,
        limits=Limits(
            max_running=max_running,
            max_waiting=max_waiting,
            max_message_bytes=int(max_message_mb * (1 << 20)),
        ),
    )
    # None: the runtime's BatcherConfig(); size 1 dispatches each request at once
    batcher = None
    if not dynamic_batching:
        batcher = BatcherConfig(max_batch_size=1, max_queue_delay_ms=0)
    elif max_queue_delay_ms is not None:
        batcher = BatcherConfig(max_queue_delay_ms=max_queue_delay_ms)
    log_stream = None
    if log_file is not None:
        try:
            log_stream = open(log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise EngineError(f"cannot open the log file {log_file}: {exc}") from None
    logs.configure(log_level, log_stream)

    if spin and device == "cpu":
        # One intra-op pool for every model: sessions with pools of their own spin against
        # each other (engine/runtime/backends.py, share_thread_pool).
        from engine.runtime import backends

        backends.share_thread_pool(threads or os.cpu_count() or 1)
    policy = VersionPolicy.parse(version_policy)
    if ray and (auth_token_file or tls_cert):
        raise EngineError("--ray serves through Ray Serve's gRPC proxy: no --auth-token-file/--tls")
    engine_kwargs = {
        "device": device,
        "backend": backend,
        "threads": threads,
        "spin": spin,
        "batcher": batcher,
        "config": EngineConfig(
            max_num_seqs=max_num_seqs,
            kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            cuda_graphs=cuda_graphs,
            enable_prefix_caching=prefix_caching,
            max_model_len=max_model_len,
        ),
    }

    if ray:
        from engine.server.ray_serve import serve_on_ray

        serve_on_ray(Path(repo), replicas, port, names, version_policy, engine_kwargs, ray_address)
        return

    def opener(repo_path: Path, name: str, version: int):
        return open_served(repo_path, name, version, **engine_kwargs)

    async def main() -> None:
        manager = ModelManager(Path(repo), opener, policy)
        await manager.load_all(names)
        server = EngineServer(manager.models, config, manager=manager)
        try:
            await server.start()
        except BaseException:
            for model in manager.models:
                await model.close()
            raise
        scheme = "grpcs" if config.tls_cert else "grpc"
        print(
            f"serving {', '.join(server.models.names())} on {scheme}://{host}:{server.port}"
            + (
                f", metrics on http://{host}:{server.metrics_port}/metrics"
                if server.metrics_port
                else ""
            ),
            file=sys.stderr,
            flush=True,
        )
        await server.run_until_signal()

    try:
        asyncio.run(main())
    finally:
        if log_stream is not None:
            logs.configure(log_level)  # back to stderr before the file goes
            log_stream.close()


@dataclass(frozen=True)
class Connection:
    """How a client command reaches a server: address, credentials, TLS, deadline, patience."""

    target: str = "127.0.0.1:50051"
    token: str | None = None
    token_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    timeout: float | None = None
    wait: float = 0.0  # seconds to wait for the server to accept connections (0: fail at once)

    def open(self):
        """An :class:`engine.client.EngineClient` (a context manager) for this server."""
        from engine.client import EngineClient, read_token

        token = read_token(self.token, self.token_file)
        client = EngineClient(
            self.target, token=token, tls=self.tls, tls_ca=self.tls_ca, timeout=self.timeout
        )
        if self.wait > 0:
            try:
                client.wait_ready(self.wait)
            except BaseException:
                client.close()
                raise
        return client


def client_generate(
    conn: Connection,
    model: str,
    prompt: str,
    out: TextIO | None = None,
    **params: Any,
) -> str:
    """Stream a completion to ``out`` (stdout) as it arrives; return the whole text.

    ``params`` are engine.v1 sampling fields (:func:`engine.client.sampling_params`); a field
    left out or None takes the server's default. With ``logprobs``, each token's logprob (and
    the top alternatives) follows the text, one token a line.
    """
    out = out or sys.stdout
    parts, logprobs = [], []
    with conn.open() as client:
        for chunk in client.generate_stream(model, prompt, **params):
            out.write(chunk.text)
            out.flush()
            parts.append(chunk.text)
            logprobs.extend(chunk.logprobs)
    out.write("\n")
    for lp in logprobs:
        top = " ".join(f"{t.token_id}:{t.logprob:.3f}" for t in lp.top)
        out.write(f"{lp.token_id}\t{lp.logprob:.4f}\t{top}\n")
    return "".join(parts)


def client_classify(
    conn: Connection,
    model: str,
    texts: Sequence[str],
    out: TextIO | None = None,
) -> list:
    """Print each text's label and probability; return the Classified results."""
    out = out or sys.stdout
    with conn.open() as client:
        results = client.classify(model, list(texts))
    for text, result in zip(texts, results):
        short = text if len(text) <= 60 else text[:57] + "..."
        out.write(f"{result.label}\t{result.probabilities[result.label]:.3f}\t{short}\n")
    return results


def client_sample_images(
    conn: Connection,
    model: str,
    digits: Sequence[int],
    seed: int | None = None,
    out_dir: Path = Path("."),
    out: TextIO | None = None,
) -> list[Path]:
    """Write one PNG per digit into ``out_dir`` (digit<d>_<i>.png); print and return the paths."""
    out = out or sys.stdout
    with conn.open() as client:
        response = client.sample_images(model, list(digits), seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(response.images):
        path = out_dir / f"digit{image.digit}_{i}.png"
        write_bytes(path, image.png)  # atomic: a reader never sees half a PNG
        paths.append(path)
        out.write(f"{path}\n")
    out.write(f"seed {response.seed}\n")
    return paths


def client_models(
    conn: Connection,
    out: TextIO | None = None,
) -> list:
    """Print the served models (name, version, task, architecture); return the summaries."""
    out = out or sys.stdout
    with conn.open() as client:
        models = client.models()
    for m in models:
        out.write(f"{m.name}\tv{m.version}\t{m.task}\t{m.architecture}\n")
    return models
