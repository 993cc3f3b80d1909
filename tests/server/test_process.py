"""The server as a process: no torch on the serving path, and SIGTERM drains then exits 0."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from tests.server.conftest import ServerProcess


@pytest.fixture()
def process_factory():
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def test_serving_path_never_imports_torch(process_factory):
    server = process_factory("--fake")
    assert server.info["torch_loaded"] is False
    with grpc.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        assert len(stub.ListModels(pb.ListModelsRequest()).models) == 3
    assert server.terminate() == 0


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(process_factory):
    server = process_factory("--fake", "--delay", "0.02", "--grace", "10")
    request = pb.GenerateRequest(
        model="lm", prompt="a", params=pb.SamplingParams(max_tokens=50, temperature=0)
    )
    with grpc.insecure_channel(server.target) as channel:
        stream = engine_pb2_grpc.EngineServiceStub(channel).Generate(request)
        first = next(stream)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with grpc.insecure_channel(server.target) as late:  # new calls are refused
            with pytest.raises(grpc.RpcError) as info:
                engine_pb2_grpc.EngineServiceStub(late).ListModels(
                    pb.ListModelsRequest(), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)  # the in-flight stream runs to its end
    assert 1 + len(rest) == 50 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert first.text
    assert server.proc.wait(30) == 0


def test_sigterm_ends_what_outlives_the_grace_period_with_unavailable(process_factory):
    server = process_factory("--fake", "--delay", "0.02", "--grace", "0.5")
    request = pb.GenerateRequest(
        model="lm", prompt="a", params=pb.SamplingParams(max_tokens=10_000)
    )
    with grpc.insecure_channel(server.target) as channel:
        stream = engine_pb2_grpc.EngineServiceStub(channel).Generate(request)
        next(stream)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # retry elsewhere
        assert "shut down" in info.value.details()
    assert server.proc.wait(30) == 0
    assert time.monotonic() - start < 10


def _unimplemented(channel: grpc.Channel, method: str) -> bool:
    """True if ``method`` answers UNIMPLEMENTED (raw bytes: no stubs of the package needed)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    return info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_server_without_the_health_and_reflection_packages_serves_and_says_so(
    process_factory,
):
    """What a bare GPU host without grpcio-health-checking/-reflection gets: no crash, a log."""
    server = process_factory("--fake", "--without", "grpc_health,grpc_reflection")
    with grpc.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        assert len(stub.ListModels(pb.ListModelsRequest()).models) == 3
        assert _unimplemented(channel, "/grpc.health.v1.Health/Check")
    assert server.terminate() == 0
    log = server.stderr()
    assert "health checking off" in log and "pip install grpcio-health-checking" in log
    assert "reflection off" in log and "pip install grpcio-reflection" in log
    assert "Traceback" not in log


def test_with_the_packages_health_answers_and_nothing_is_logged_off(process_factory):
    pytest.importorskip("grpc_health", reason="grpcio-health-checking is not installed")
    server = process_factory("--fake")
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert raw(b"", timeout=10) == b"\x08\x01"  # HealthCheckResponse(status=SERVING)
    assert server.terminate() == 0
    assert " off" not in server.stderr()
