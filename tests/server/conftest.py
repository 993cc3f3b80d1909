"""Fixtures: a real server on a free localhost port, run in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engine.proto import engine_pb2_grpc, grpc_predict_v2_pb2_grpc
from engine.server import logs
from engine.server.app import EngineServer, ServerConfig
from engine.server.serving import Limits
from tests.server.fakes import fake_models

ROOT = Path(__file__).resolve().parents[2]
SERVE_SCRIPT = Path(__file__).with_name("serve_process.py")


class ServerThread:
    """An EngineServer running on a private event loop; call from the test thread."""

    def __init__(self, models, config: ServerConfig, manager=None):
        self.models = {m.card.name: m for m in models}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(self._make(models, config, manager))
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @staticmethod
    async def _make(models, config: ServerConfig, manager=None) -> EngineServer:
        return EngineServer(models, config, manager=manager)  # inside the loop that serves it

    @staticmethod
    async def _finish_tasks() -> None:
        """Cancel and await what is left, as asyncio.run does before closing its loop."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def call(self, coro, timeout: float = 30):
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn, timeout: float = 30):
        """Run a plain function on the server's loop (to read model state safely)."""

        async def wrapper():
            return fn()

        return self.call(wrapper(), timeout)

    def stop(self, grace: float = 0.0) -> None:
        self.call(self.server.stop(grace))
        self.call(self._finish_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def start_server(models=None, manager=None, **config) -> ServerThread:
    """A server on a free port with metrics on a free port, unless ``config`` says otherwise."""
    logs.configure("WARNING")
    config.setdefault("port", 0)
    config.setdefault("metrics_port", 0)
    config.setdefault("grace", 0.0)
    config.setdefault("limits", Limits(max_running=64, max_waiting=1024))
    models = fake_models() if models is None else models
    return ServerThread(models, ServerConfig(**config), manager)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One server with a fake model of each task, shared by a test module."""
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture()
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture()
def engine_stub(channel):
    return engine_pb2_grpc.EngineServiceStub(channel)


@pytest.fixture()
def kserve_stub(channel):
    return grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)


class ServerProcess:
    """A server started with serve_process.py; ``info`` is its ready line."""

    def __init__(self, *args: str):
        # A file, not a pipe, so a chatty server never blocks on a full pipe; closed in kill().
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE_SCRIPT), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise AssertionError(f"server did not start: {self.stderr()[-3000:]}")
        self.info = json.loads(line)
        self.target = f"127.0.0.1:{self.info['port']}"

    def stderr(self) -> str:
        """What the server wrote to stderr so far."""
        self.log.seek(0)
        return self.log.read()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()
        self.log.close()
