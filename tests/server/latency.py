"""Latency of a unary classify and a streamed generate: through the server versus in process.

    python tests/server/latency.py [--repo DIR] [--n 200] [--max-tokens 32]

Without --repo a tiny repository is trained and exported first (as the e2e tests do). Requests
are sequential (one in flight), so the figures are the per-request cost of gRPC, protobuf and
the server on top of the same runtime, not throughput. In-process and server requests alternate
in blocks of ``--block`` so both see the same machine load (a shared machine drifts a lot).
Prints p50/p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PROMPT = "def parse(line):"
TEXT = "Return the sum of two numbers."
WARMUP = 10  # first requests of each path warm the sessions up and are not counted


class InProcess:
    """The runtime engines in this process, driven on a private event loop."""

    def __init__(self, repo: Path, max_tokens: int):
        from engine.runtime import Engine, SamplingParams

        self.loop = asyncio.new_event_loop()
        self.clf = Engine.from_repository(repo, "clf")
        self.lm = Engine.from_repository(repo, "lm")
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def classify(self) -> None:
        self.loop.run_until_complete(self.clf.classify([TEXT]))

    def generate(self) -> float:
        async def run() -> float:
            start, first = time.perf_counter(), None
            async for _ in self.lm.generate(PROMPT, self.params):
                first = first or time.perf_counter()
            return first - start

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.clf.close()
        self.lm.close()
        self.loop.close()


class ThroughServer:
    """The same requests through engine.v1 on a server process."""

    def __init__(self, target: str, max_tokens: int):
        from engine.client import EngineClient

        self.client = EngineClient(target)
        self.max_tokens = max_tokens

    def classify(self) -> None:
        self.client.classify("clf", [TEXT])

    def generate(self) -> float:
        start, first = time.perf_counter(), None
        for _ in self.client.generate_stream(
            "lm", PROMPT, temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True
        ):
            first = first or time.perf_counter()
        return first - start

    def close(self) -> None:
        self.client.close()


def measure(paths: dict, n: int, block: int) -> dict[tuple[str, str], list[float]]:
    """Alternate blocks of ``block`` requests per path and task until each has ``n``."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for task in ("classify", "generate"):
        for path in paths.values():  # warm-up, not counted
            for _ in range(WARMUP):
                getattr(path, task)()
        done = 0
        while done < n:
            for name, path in paths.items():
                for _ in range(min(block, n - done)):
                    start = time.perf_counter()
                    ttft = getattr(path, task)()
                    elapsed = time.perf_counter() - start
                    if task == "classify":
                        out[("classify", name)].append(elapsed)
                    else:
                        out[("generate ttft", name)].append(ttft)
                        out[("generate e2e", name)].append(elapsed)
            done += min(block, n - done)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    repo = args.repo
    if repo is None:
        from tests.server.test_real_models import build_repo

        repo = build_repo(Path(tempfile.mkdtemp(prefix="latency-")))
    from tests.server.conftest import ServerProcess

    server = ServerProcess("--repo", str(repo))
    paths = {
        "in process": InProcess(repo, args.max_tokens),
        "through the server": ThroughServer(server.target, args.max_tokens),
    }
    try:
        results = measure(paths, args.n, args.block)
    finally:
        for path in paths.values():
            path.close()
        server.terminate()
        server.kill()
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}; "
        f"n={args.n} per row, max_tokens={args.max_tokens}, sequential requests"
    )
    for (task, name), samples in results.items():
        ms = np.asarray(samples) * 1000
        print(
            f"{task:<14} {name:<19} p50 {np.percentile(ms, 50):8.3f} ms   "
            f"p99 {np.percentile(ms, 99):8.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
