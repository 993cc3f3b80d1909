"""Ray Serve scale-out, 1 vs 2 replicas: requests/s and tokens/s through Serve's gRPC ingress.

    python bench/ray_scale.py --repo DIR [--replicas 1,2] [--concurrency 8] [--repeats 3]

For each replica count it starts ``engine serve --ray --replicas N``, waits for an answer,
then runs ``--repeats`` rounds of two closed loops at ``--concurrency``: KServe ModelInfer on
``clf`` (one text each) and engine.v1 Generate on ``lm`` (64 greedy tokens, ignore_eos), and
prints the median and range of each with the replicas that answered. The load generator runs
in this process on the same cores as the replicas: on 2 cores no speedup is expected.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.proto import engine_pb2 as epb  # noqa: E402
from engine.proto import engine_pb2_grpc, grpc_predict_v2_pb2_grpc  # noqa: E402
from engine.proto import grpc_predict_v2_pb2 as kpb  # noqa: E402
from engine.server.ray_serve import REPLICA_HEADER  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_loop(fn, concurrency: int, seconds: float) -> tuple[float, Counter]:
    """Calls of ``fn`` per second over ``seconds`` from ``concurrency`` threads; replicas seen."""
    done, tags, lock = [0], Counter(), threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < stop:
            units, tag = fn()
            with lock:
                done[0] += units
                tags[tag] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.monotonic() - start), tags


def run(
    repo: Path, replicas: int, concurrency: int, repeats: int, seconds: float, target: str = ""
) -> dict:
    """Start ``engine serve --ray`` (or use ``target``) and measure it."""
    port = _port()
    log = open(f"/tmp/ray_scale_{replicas}.log", "w")  # noqa: SIM115 - the server's output
    proc = None
    if not target:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--ray", "--replicas", str(replicas)]
            + ["--repo", str(repo), "--port", str(port), "--no-metrics"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    channel = grpc.insecure_channel(target or f"127.0.0.1:{port}")
    kserve = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    generate = engine_pb2_grpc.EngineServiceStub(channel).Generate

    def classify() -> tuple[int, str]:
        request = kpb.ModelInferRequest(model_name="clf")
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(b"Return the number of items in the list.")
        _, call = kserve.ModelInfer.with_call(request, timeout=60)
        return 1, dict(call.trailing_metadata())[REPLICA_HEADER]

    def tokens() -> tuple[int, str]:
        params = epb.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        call = generate(epb.GenerateRequest(model="lm", prompt="def f(x):", params=params))
        n = sum(len(c.token_ids) for c in call)
        return n, dict(call.trailing_metadata())[REPLICA_HEADER]

    try:
        deadline = time.monotonic() + 400
        while True:
            try:
                classify()
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                    raise SystemExit(f"replicas={replicas}: no answer (see {log.name})") from None
                time.sleep(2)
        for _ in range(10):  # warm-up: every replica loaded and answering
            classify()
        results: dict = {"replicas": replicas, "clf_req_s": [], "lm_tok_s": [], "seen": Counter()}
        for _ in range(repeats):
            rate, seen = _closed_loop(classify, concurrency, seconds)
            results["clf_req_s"].append(rate)
            results["seen"] += seen
            rate, seen = _closed_loop(tokens, concurrency, seconds)
            results["lm_tok_s"].append(rate)
            results["seen"] += seen
        return results
    finally:
        channel.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> int:
    """Run each replica count and print medians with ranges."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--target", default="", help="measure a running server (one count)")
    args = parser.parse_args()
    print(f"uptime: {os.getloadavg()}")
    for n in (int(x) for x in args.replicas.split(",")):
        r = run(args.repo, n, args.concurrency, args.repeats, args.seconds, args.target)
        for key in ("clf_req_s", "lm_tok_s"):
            values = r[key]
            print(
                f"replicas={n} {key}: median {statistics.median(values):,.0f} "
                f"(range {min(values):,.0f}-{max(values):,.0f}, {len(values)} runs)"
            )
        print(f"replicas={n} answered by: {dict(r['seen'])}")
    print(f"uptime: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
