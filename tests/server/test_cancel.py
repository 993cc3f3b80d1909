"""Cancelled calls, expired deadlines and vanished clients abort their generation and free KV."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from engine.server.serving import Limits
from tests.server.conftest import start_server
from tests.server.fakes import FakeLM

ROOT = Path(__file__).resolve().parents[2]
LONG = pb.GenerateRequest(
    model="lm",
    prompt="once upon a time",
    params=pb.SamplingParams(max_tokens=100_000, ignore_eos=True),
)


@pytest.fixture()
def slow():
    """A server whose LM takes 10 ms a token and has room for long generations."""
    lm = FakeLM(delay=0.01, context_length=1_000_000)
    srv = start_server([lm], limits=Limits(max_running=1024, max_waiting=1024))
    yield srv, lm
    srv.stop()


def _wait_for_zero_kv(srv, lm, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = srv.run(lm.kv_blocks_used)
        if used == 0:
            return 0
        time.sleep(0.05)
    return srv.run(lm.kv_blocks_used)


def test_cancelling_hundreds_of_streams_frees_every_kv_block(slow):
    srv, lm = slow
    with grpc.insecure_channel(srv.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        calls = [stub.Generate(LONG) for _ in range(300)]
        for call in calls:
            next(call)  # every request is admitted and holds KV memory mid-generation
        assert srv.run(lm.kv_blocks_used) > 0
        for call in calls:
            call.cancel()
        assert _wait_for_zero_kv(srv, lm) == 0
    assert len(srv.run(lambda: list(lm.aborted))) == 300
    assert srv.run(lambda: srv.server.serving.queues["lm"].running) == 0


def test_expired_deadlines_abort_the_generation(slow):
    srv, lm = slow
    with grpc.insecure_channel(srv.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        calls = [stub.Generate(LONG, timeout=0.5) for _ in range(50)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for_zero_kv(srv, lm) == 0


def test_cancelling_a_kserve_stream_aborts_its_generations(slow):
    tg = pytest.importorskip("tritonclient.grpc")
    srv, lm = slow
    client = tg.InferenceServerClient(srv.target)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    prompt = tg.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hello"], dtype=object))
    for i in range(50):
        client.async_stream_infer(
            "lm", [prompt], request_id=str(i), parameters={"max_tokens": 100_000}
        )
    seen = set()
    while len(seen) < 50:  # every request is generating
        result, error = responses.get(timeout=10)
        assert error is None
        seen.add(result.get_response().id)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert _wait_for_zero_kv(srv, lm) == 0


def test_a_killed_client_process_frees_its_kv_blocks(slow):
    srv, lm = slow
    script = (
        "import sys, grpc\n"
        "from engine.proto import engine_pb2 as pb, engine_pb2_grpc as g\n"
        f"stub = g.EngineServiceStub(grpc.insecure_channel('{srv.target}'))\n"
        "req = pb.GenerateRequest(model='lm', prompt='x', "
        "params=pb.SamplingParams(max_tokens=100000))\n"
        "calls = [stub.Generate(req) for _ in range(20)]\n"
        "[next(c) for c in calls]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert srv.run(lm.kv_blocks_used) > 0
        proc.send_signal(signal.SIGKILL)  # no goodbye: the connection just drops
        proc.wait(10)
    finally:
        proc.kill()
    assert _wait_for_zero_kv(srv, lm) == 0


def test_a_stream_that_never_reads_cannot_grow_the_server_without_bound():
    """Large responses nobody reads fill gRPC's window; the server then stops reading requests."""
    from engine.proto import grpc_predict_v2_pb2 as kpb
    from engine.proto import grpc_predict_v2_pb2_grpc
    from tests.server.fakes import FakeGan

    srv = start_server([FakeGan()], limits=Limits(max_running=2, max_waiting=2, max_batch=256))

    def requests():
        for i in range(3000):
            request = kpb.ModelInferRequest(model_name="gan", id=str(i))
            request.inputs.add(name="digit", datatype="INT64", shape=[256])
            request.inputs[0].contents.int64_contents.extend([i % 10] * 256)
            yield request  # each answer is 256 images: 64 KiB

    async def server_tasks() -> int:
        import asyncio

        return len(asyncio.all_tasks())

    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(requests())  # responses are never read
            time.sleep(2)
            assert srv.call(server_tasks()) < 50  # a handful of open requests, not thousands
            call.cancel()
    finally:
        srv.stop()
