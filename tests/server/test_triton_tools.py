"""Triton's tools on real models: ModelConfig, statistics, repository control, the LLM tensors.

One server process over a copy of the tiny repository, with a ``broken`` model whose manifest
lacks a serving key: the broken one is reported not ready and
everything else serves. Driven by unmodified ``tritonclient[grpc]``.
"""

from __future__ import annotations

import json
import queue
import shutil

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import run_cli
from tests.server.conftest import ServerProcess

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402


def _edit_manifest(version_dir, edit) -> None:
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def repo(served_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton") / "repo"
    shutil.copytree(served_repo, root)
    shutil.copytree(root / "clf" / "1", root / "broken" / "1")
    _edit_manifest(root / "broken" / "1", lambda m: m["serving"].pop("max_length"))
    return root


@pytest.fixture(scope="module")
def server(repo):
    proc = ServerProcess("--repo", str(repo), "--grace", "5")
    yield proc
    code = proc.terminate()
    log = proc.stderr()
    proc.kill()
    assert code == 0, log[-2000:]


@pytest.fixture()
def client(server):
    return grpcclient.InferenceServerClient(server.target)


def _text(name: str, *values: bytes):
    tensor = grpcclient.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object))
    return tensor


def _bool(name: str, value: bool):
    tensor = grpcclient.InferInput(name, [1], "BOOL")
    tensor.set_data_from_numpy(np.array([value]))
    return tensor


GREEDY = json.dumps({"temperature": "0", "max_tokens": "12", "ignore_eos": True})
# Long enough that the stream surely sends more than one response: tokens that pile up while
# the client is slow are merged into one, and 12 tokens of this tiny model can all be
# generated before the first response goes out.
GREEDY_LONG = json.dumps({"temperature": "0", "max_tokens": "96", "ignore_eos": True})


def test_a_model_with_a_broken_manifest_is_not_ready_and_the_others_serve(server, client, repo):
    assert client.is_server_ready()
    assert not client.is_model_ready("broken")
    assert all(client.is_model_ready(name) for name in ("lm", "clf", "gan"))
    with grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        status = check(health_pb2.HealthCheckRequest(service="broken")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        status = check(health_pb2.HealthCheckRequest(service="clf")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE" and "max_length" in index["broken"].reason
    lines = [line for line in server.stderr().splitlines() if '"broken"' in line]
    assert len(lines) == 1 and "max_length" in lines[0], lines
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer("broken", [_text("text", b"x")])
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "max_length" in info.value.message()
    done = run_cli("classify", "--repo", str(repo), "--model", "broken", "some text")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "max_length" in done.stderr


def test_model_config_describes_each_task_as_triton_does(client):
    lm = client.get_model_config("lm").config
    assert lm.max_batch_size == 0 and lm.model_transaction_policy.decoupled
    inputs = {i.name: i for i in lm.input}
    assert inputs["text_input"].data_type == mc.TYPE_STRING and not inputs["text_input"].optional
    assert inputs["stream"].data_type == mc.TYPE_BOOL and inputs["stream"].optional
    assert inputs["sampling_parameters"].data_type == mc.TYPE_STRING
    assert "text_output" in [o.name for o in lm.output]
    assert lm.parameters["context_length"].string_value == "128"
    clf = client.get_model_config("clf").config
    assert clf.max_batch_size == 32 and clf.HasField("dynamic_batching")
    assert not clf.model_transaction_policy.decoupled
    outputs = {o.name: list(o.dims) for o in clf.output}
    labels = clf.parameters["labels"].string_value.split(",")
    assert outputs["probabilities"] == [len(labels)]
    gan = client.get_model_config("gan").config
    assert {o.name: list(o.dims) for o in gan.output} == {"image": [1, 8, 8]}
    assert gan.platform == "onnxruntime_onnx" and gan.backend == "onnxruntime"


def test_statistics_come_from_the_runtime_counters(client):
    before = client.get_inference_statistics("clf").model_stats[0]
    for _ in range(3):
        client.infer("clf", [_text("text", b"Return the sum.", b"Open a file.")])
    stats = client.get_inference_statistics("clf").model_stats[0]
    assert stats.inference_stats.success.count - before.inference_stats.success.count == 3
    assert stats.inference_count - before.inference_count == 6
    batches = {b.batch_size: b.compute_infer.count for b in stats.batch_stats}
    assert sum(batches.values()) == stats.execution_count >= 3 and 2 in batches
    assert all(b.compute_infer.ns > 0 for b in stats.batch_stats)


def test_triton_llm_tensors_stream_and_end_with_a_final_flag(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = [
            _text("text_input", b"def f(x):"),
            _bool("stream", True),
            _text("sampling_parameters", GREEDY_LONG.encode()),
        ]
        client.async_stream_infer("lm", inputs, request_id="r1")
        pieces, final = [], False
        while not final:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "r1"
            final = response.parameters["triton_final_response"].bool_param
            pieces.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
    assert len(pieces) > 1  # one response per chunk, the last flagged final
    unary = client.infer(
        "lm",
        [_text("text_input", b"def f(x):"), _text("sampling_parameters", GREEDY_LONG.encode())],
    )
    whole = unary.as_numpy("text_output")[0].decode()
    assert whole == "def f(x):" + "".join(pieces)  # the prompt too: exclude_input_in_output false
    excluded = client.infer(
        "lm",
        [
            _text("text_input", b"def f(x):"),
            _text("sampling_parameters", GREEDY_LONG.encode()),
            _bool("exclude_input_in_output", True),
        ],
    )
    assert excluded.as_numpy("text_output")[0].decode() == "".join(pieces)
    assert excluded.as_numpy("completion_tokens")[0] == 96


def test_stream_false_answers_once_and_unknown_sampling_keys_are_refused(client):
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = [
            _text("text_input", b"import os"),
            _bool("stream", False),
            _text("sampling_parameters", GREEDY.encode()),
            _bool("exclude_input_in_output", True),
        ]
        client.async_stream_infer("lm", inputs)
        result, error = responses.get(timeout=60)
        assert error is None
        assert result.get_response().parameters["triton_final_response"].bool_param
        assert result.as_numpy("completion_tokens")[0] == 12
    finally:
        client.stop_stream()
    bad = _text("sampling_parameters", json.dumps({"temprature": 0.5}).encode())
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.infer("lm", [_text("text_input", b"x"), bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "temprature" in info.value.message()


def test_loading_picks_up_a_new_version_without_a_restart(client, repo):
    prompt = [_text("text_input", b"ab")]
    assert (
        client.infer("lm", prompt, parameters={"max_tokens": 2}).get_response().model_version == "1"
    )
    shutil.copytree(repo / "lm" / "1", repo / "lm" / "2")  # a new export lands
    _edit_manifest(repo / "lm" / "2", lambda m: m.update(version=2))
    client.load_model("lm")  # the default policy, latest:1, now selects version 2
    response = client.infer("lm", prompt, parameters={"max_tokens": 2}).get_response()
    assert response.model_version == "2"
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("lm", "1")] == "UNAVAILABLE" and index[("lm", "2")] == "READY"
    stats = client.get_inference_statistics("lm").model_stats
    assert [s.version for s in stats] == ["2"]
