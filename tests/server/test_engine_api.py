"""The engine.v1 API end to end over a real socket: results, errors, health, reflection, metrics."""

from __future__ import annotations

import json
import time
import urllib.request
import zlib

import grpc
import numpy as np
import pytest

from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from engine.server.serving import Limits
from tests.server.conftest import start_server
from tests.server.fakes import FakeLM

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if not hasattr(result, "SerializeToString"):  # a stream: the error comes on reading
            list(result)
    return info.value


def test_list_models_and_model_info(engine_stub):
    models = {m.name: m for m in engine_stub.ListModels(pb.ListModelsRequest()).models}
    assert {n: m.task for n, m in models.items()} == {
        "lm": "generate",
        "clf": "classify",
        "gan": "sample_images",
    }
    assert all(m.ready for m in models.values())
    info = engine_stub.ModelInfo(pb.ModelInfoRequest(model="clf"))
    assert list(info.labels) == ["neg", "neu", "pos"]
    assert json.loads(info.manifest_json)["task"] == "classify"
    assert engine_stub.ModelInfo(pb.ModelInfoRequest(model="lm")).context_length == 64


def test_generate_streams_chunks_then_finish_and_usage(engine_stub):
    request = pb.GenerateRequest(
        model="lm",
        prompt="hello",
        request_id="req-1",
        params=pb.SamplingParams(max_tokens=6, temperature=0),
    )
    chunks = list(engine_stub.Generate(request))
    assert len(chunks) == 6
    assert all(c.request_id == "req-1" for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * 5
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.total_tokens == 11
    assert sum(len(c.token_ids) for c in chunks) == 6
    again = "".join(c.text for c in engine_stub.Generate(request))
    assert again == "".join(c.text for c in chunks)  # greedy is deterministic


def test_generate_returns_logprobs_when_asked(engine_stub):
    request = pb.GenerateRequest(
        model="lm", prompt="ab", params=pb.SamplingParams(max_tokens=2, logprobs=3)
    )
    chunks = list(engine_stub.Generate(request))
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert len(chunks[0].logprobs[0].top) == 3


def test_request_id_comes_back_in_trailing_metadata(engine_stub):
    _, call = engine_stub.ListModels.with_call(
        pb.ListModelsRequest(), metadata=(("x-request-id", "abc-123"),)
    )
    assert ("x-request-id", "abc-123") in call.trailing_metadata()


def test_a_request_id_with_a_trailing_newline_is_invalid_not_internal(engine_stub):
    request = pb.GenerateRequest(model="lm", prompt="a", request_id="0\n")
    with pytest.raises(grpc.RpcError) as info:
        list(engine_stub.Generate(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_classify_returns_a_label_and_probabilities_per_text(engine_stub):
    response = engine_stub.Classify(pb.ClassifyRequest(model="clf", texts=["abc", "hello", "x"]))
    assert len(response.results) == 3
    for result in response.results:
        probs = np.array(result.probabilities)
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert (
            result.label == response.labels[int(probs.argmax())] == response.labels[result.label_id]
        )


def test_sample_images_returns_png_and_raw_pixels(engine_stub):
    response = engine_stub.SampleImages(pb.SampleImagesRequest(model="gan", digits=[3, 7], seed=11))
    assert list(response.shape) == [1, 8, 8] and response.seed == 11
    assert [im.digit for im in response.images] == [3, 7]
    for image in response.images:
        assert image.png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(image.pixels) == 64
        # The PNG holds the raw pixels, scaled to 8 bits (IDAT is zlib of filter byte + row).
        idat = image.png[image.png.index(b"IDAT") + 4 : image.png.index(b"IEND") - 8]
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(8, 9)[:, 1:]
        expected = np.round((np.array(image.pixels).reshape(8, 8) + 1) / 2 * 255)
        assert np.abs(rows - expected).max() <= 1
    same = engine_stub.SampleImages(pb.SampleImagesRequest(model="gan", digits=[3, 7], seed=11))
    assert same.images[0].pixels == response.images[0].pixels


def test_tokenize(engine_stub):
    response = engine_stub.Tokenize(pb.TokenizeRequest(model="lm", text="abc"))
    assert list(response.token_ids) == [4, 5, 6] and list(response.tokens) == ["a", "b", "c"]
    assert _error(engine_stub.Tokenize, pb.TokenizeRequest(model="gan", text="a")).code() == INVALID


@pytest.mark.parametrize(
    ("request_", "code", "detail"),
    [
        (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "not served"),
        (
            pb.GenerateRequest(model="lm", prompt="x", version="9"),
            grpc.StatusCode.NOT_FOUND,
            "no version",
        ),
        (pb.GenerateRequest(prompt="x"), INVALID, "no model named"),
        (pb.GenerateRequest(model="lm", prompt=""), INVALID, "prompt is empty"),
        (pb.GenerateRequest(model="lm", prompt="a" * 100), INVALID, "context is 64"),
        (pb.GenerateRequest(model="clf", prompt="x"), INVALID, "cannot generate"),
        (
            pb.GenerateRequest(model="lm", prompt="x", params=pb.SamplingParams(top_p=1.5)),
            INVALID,
            "top_p must be in (0, 1]",
        ),
        (
            pb.GenerateRequest(model="lm", prompt="x", params=pb.SamplingParams(temperature=-1)),
            INVALID,
            "temperature",
        ),
        (
            pb.GenerateRequest(model="lm", prompt="x", params=pb.SamplingParams(max_tokens=0)),
            INVALID,
            "max_tokens",
        ),
        (
            pb.GenerateRequest(model="lm", prompt="x", params=pb.SamplingParams(logprobs=99)),
            INVALID,
            "logprobs",
        ),
        (
            pb.GenerateRequest(model="lm", prompt="x", params=pb.SamplingParams(stop=[""])),
            INVALID,
            "stop",
        ),
        (pb.GenerateRequest(model="lm", prompt="x", request_id="has space"), INVALID, "request_id"),
    ],
)
def test_generate_refuses_bad_requests_with_an_actionable_status(
    engine_stub, request_, code, detail
):
    error = _error(engine_stub.Generate, request_)
    assert error.code() == code
    assert detail in error.details()


@pytest.mark.parametrize(
    ("method", "request_", "detail"),
    [
        ("Classify", pb.ClassifyRequest(model="clf"), "texts is empty"),
        ("Classify", pb.ClassifyRequest(model="clf", texts=["a", ""]), "texts[1] is empty"),
        ("Classify", pb.ClassifyRequest(model="clf", texts=["a"] * 300), "limit is 256"),
        ("SampleImages", pb.SampleImagesRequest(model="gan", digits=[10]), "digits 0 to 9"),
        ("SampleImages", pb.SampleImagesRequest(model="gan", digits=[-1]), "digits 0 to 9"),
        ("SampleImages", pb.SampleImagesRequest(model="lm", digits=[1]), "cannot sample images"),
    ],
)
def test_batch_requests_are_validated(engine_stub, method, request_, detail):
    error = _error(getattr(engine_stub, method), request_)
    assert error.code() == INVALID and detail in error.details()


def test_oversized_and_undecodable_messages_are_invalid_argument(server, channel, engine_stub):
    huge = pb.ClassifyRequest(model="clf", texts=["x" * (1 << 20)] * 5)  # 5 MiB > 4 MiB
    error = _error(engine_stub.Classify, huge)
    assert error.code() == INVALID and "at most" in error.details()
    raw = channel.unary_unary("/engine.v1.EngineService/Classify")  # bytes in, bytes out
    error = _error(raw, b"\x12\x03\xff\xfe\xfd")  # texts[0] is not valid UTF-8
    assert error.code() == INVALID and "engine.v1.ClassifyRequest" in error.details()


def test_admission_queue_refuses_at_once_when_full():
    srv = start_server([FakeLM(delay=0.05)], limits=Limits(max_running=1, max_waiting=1))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = engine_pb2_grpc.EngineServiceStub(ch)
            req = pb.GenerateRequest(
                model="lm", prompt="a", params=pb.SamplingParams(max_tokens=20)
            )
            running = stub.Generate(req)
            next(running)  # the first runs
            waiting = stub.Generate(req)
            queue = srv.server.serving.queues["lm"]
            deadline = time.monotonic() + 10
            while srv.run(lambda: queue.waiting) == 0:  # the second is in line
                assert time.monotonic() < deadline
                time.sleep(0.01)
            error = _error(stub.Generate, req)  # the third finds the line full
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry" in error.details()
            assert len(list(waiting)) == 20  # the waiting one is served in turn
            running.cancel()
    finally:
        srv.stop()


def test_health_overall_and_per_model(channel):
    pytest.importorskip("grpc_health", reason="grpcio-health-checking is not installed")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "lm",
        "clf",
        "gan",
        "engine.v1.EngineService",
        "inference.GRPCInferenceService",
    ):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    error = _error(stub.Check, health_pb2.HealthCheckRequest(service="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(channel):
    pytest.importorskip("grpc_reflection", reason="grpcio-reflection is not installed")
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService"
        ),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "engine.v1.EngineService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint_reports_requests_and_latencies(server, engine_stub):
    engine_stub.Classify(pb.ClassifyRequest(model="clf", texts=["a", "b", "c"]))
    list(
        engine_stub.Generate(
            pb.GenerateRequest(model="lm", prompt="metrics", params=pb.SamplingParams(max_tokens=3))
        )
    )
    _error(engine_stub.Generate, pb.GenerateRequest(model="nope-metrics", prompt="x"))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'engine_requests_total{method="Generate",model="lm",status="OK"}' in text
    assert 'engine_requests_total{method="Generate",model="",status="NOT_FOUND"}' in text
    assert "nope-metrics" not in text  # unknown names never become label values
    for name in (
        "engine_time_to_first_token_seconds_bucket",
        "engine_e2e_request_latency",
        "engine_time_per_output_token_seconds",
        "engine_kv_blocks_used",
        "engine_kv_blocks_free",
        "engine_queue_length",
        "engine_running_requests",
        "engine_prompt_tokens_total",
        "engine_generation_tokens_total",
        "engine_batch_size",
    ):
        assert name in text, name


def test_every_request_is_logged_as_json_with_its_request_id(server, engine_stub):
    import io

    from engine.server import logs

    stream = io.StringIO()
    logs.configure("INFO", stream)
    try:
        engine_stub.ListModels(pb.ListModelsRequest(), metadata=(("x-request-id", "log-1"),))
        _error(
            engine_stub.Generate, pb.GenerateRequest(model="nope", prompt="x", request_id="log-2")
        )
        # A call's line is written as its handler exits, which can be just after the client
        # has its status: wait for it rather than race the server's thread.
        deadline = time.monotonic() + 5
        while '"log-2"' not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logs.configure("WARNING")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_id = {e.get("request_id"): e for e in entries}
    assert by_id["log-1"]["method"] == "ListModels" and by_id["log-1"]["status"] == "OK"
    assert by_id["log-2"]["status"] == "NOT_FOUND" and by_id["log-2"]["duration_ms"] >= 0
