"""`engine serve --ray --replicas 2`: a real Ray Serve on this one node, driven over gRPC.

Requests spread over both replicas (each response names its replica), a replica killed under
load costs only the requests it was serving, new requests keep succeeding, and Ray starts a
replacement. About two minutes here (Ray's start-up and two model loads on 2 cores).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from engine.proto import engine_pb2 as epb
from engine.proto import engine_pb2_grpc, grpc_predict_v2_pb2_grpc
from engine.proto import grpc_predict_v2_pb2 as kpb
from engine.server.ray_serve import REPLICA_HEADER

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")
ROOT = Path(__file__).resolve().parents[2]
WORKERS = 8  # concurrent streams while a replica is killed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _classify(stub, text: str = "Open a file and read it.") -> tuple[str, str]:
    """(label, replica tag) of one KServe ModelInfer on the classifier."""
    request = kpb.ModelInferRequest(model_name="clf")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(text.encode())
    response, call = stub.ModelInfer.with_call(request, timeout=60)
    tags = dict(call.trailing_metadata())
    return response.outputs[0].name, tags[REPLICA_HEADER]


@pytest.fixture(scope="module")
def ray_server(served_repo):
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--ray", "--replicas", "2"]
        + ["--repo", str(served_repo), "--port", str(port), "--no-metrics"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + 400
    try:
        seen: set = set()
        while len(seen) < 2:  # both replicas started (Ray brings them up one by one)
            assert time.monotonic() < deadline, f"2 replicas did not answer in 400 s: {seen}"
            try:
                seen.add(_classify(stub)[1])
                time.sleep(0.2)
            except grpc.RpcError:
                log.seek(0)
                assert proc.poll() is None, log.read()[-3000:]
                assert time.monotonic() < deadline, "Ray Serve did not answer in 400 s"
                time.sleep(2)
        yield port, stub, channel
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: Ray's workers too
            proc.wait(30)
        log.close()


def test_requests_spread_over_both_replicas(ray_server):
    _, stub, _ = ray_server
    tags: Counter = Counter()
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            _, tag = _classify(stub)
            with lock:
                tags[tag] += 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(tags.values()) == 60
    assert len(tags) == 2 and min(tags.values()) >= 5, tags  # per-replica counts


def test_a_killed_replica_costs_its_requests_only_and_ray_replaces_it(ray_server):
    _, stub, channel = ray_server
    tags = Counter(_classify(stub)[1] for _ in range(20))
    victim = next(iter(tags))
    generate = engine_pb2_grpc.EngineServiceStub(channel).Generate
    outcomes: list = []  # (start, end, status, tokens, replica)
    stop = threading.Event()

    def load() -> None:  # streams back to back until stopped: always some in flight
        request = epb.GenerateRequest(
            model="lm",
            prompt="def f(x):",
            params=epb.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
        )
        while not stop.is_set():
            start = time.monotonic()
            call = generate(request, timeout=120)
            try:
                count = sum(len(chunk.token_ids) for chunk in call)  # chunks may merge tokens
                tag = dict(call.trailing_metadata())[REPLICA_HEADER]
                outcomes.append((start, time.monotonic(), "OK", count, tag))
            except grpc.RpcError as exc:
                outcomes.append((start, time.monotonic(), exc.code().name, 0, ""))

    workers = [threading.Thread(target=load) for _ in range(WORKERS)]
    for t in workers:
        t.start()
    time.sleep(3.0)
    killed_at = time.monotonic()
    os.kill(int(victim.split("/")[1]), signal.SIGKILL)
    time.sleep(8.0)
    stop.set()
    for t in workers:
        t.join(180)
    failed = [o for o in outcomes if o[2] != "OK"]
    assert all(o[3] == 100 for o in outcomes if o[2] == "OK")
    # at most what the victim had in flight when it died fails: one stream per worker, or none
    # if Ray's router had just sent every stream to the other replica (seen on a loaded host)
    assert len(failed) <= WORKERS, failed
    assert all(o[2] in ("UNAVAILABLE", "INTERNAL") for o in failed), failed
    assert all(o[0] <= killed_at + 1.0 for o in failed), (killed_at, failed)
    later = [o for o in outcomes if o[0] > killed_at + 1.0]
    assert later and all(o[2] == "OK" for o in later)  # new requests keep succeeding
    deadline = time.monotonic() + 240
    seen: set = set()
    while time.monotonic() < deadline and len(seen - {victim}) < 2:
        seen.add(_classify(stub)[1])
        time.sleep(0.5)
    assert len(seen - {victim}) >= 2, seen  # the survivor and Ray's replacement
    print(
        f"killed {victim}: {len(outcomes)} streams, failed {Counter(o[2] for o in failed)}, "
        f"{len(later)} started after the kill all OK; replicas now {sorted(seen)}"
    )
