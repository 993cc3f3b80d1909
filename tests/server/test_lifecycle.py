"""Triton's repository control with tritonclient: load, reload and unload while serving.

Fake models (no training) behind the real server, manager and version policy: a new version
is switched in at once, requests in flight finish on the old one, which is closed only then.
"""

from __future__ import annotations

import dataclasses
import json
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.errors import EngineError
from engine.proto import engine_pb2 as epb
from engine.proto import engine_pb2_grpc
from engine.server.lifecycle import ModelManager, VersionPolicy, VersionPolicyError
from tests.server.conftest import start_server
from tests.server.fakes import FakeClassifier, FakeLM

grpcclient = pytest.importorskip("tritonclient.grpc")


class TrackedLM(FakeLM):
    """A fake LM that records when it is closed (its memory freed)."""

    def __init__(self, version: int, delay: float):
        super().__init__(delay=delay)
        self.card = dataclasses.replace(self.card, version=version)
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def _repo(tmp_path, versions):
    for v in versions:
        (tmp_path / "lm" / str(v)).mkdir(parents=True)
        (tmp_path / "lm" / str(v) / "manifest.json").write_text(json.dumps({"v": v}))
    (tmp_path / "clf" / "1").mkdir(parents=True)
    (tmp_path / "clf" / "1" / "manifest.json").write_text("{}")
    return tmp_path


@pytest.fixture()
def managed(tmp_path):
    """A server over a fake repository (lm versions 1-2, clf 1) started under ``specific:1``."""
    repo = _repo(tmp_path, (1, 2))
    opened: list = []

    def opener(path, name, version):
        if (path / name / str(version) / "broken").exists():
            raise EngineError(f"model {name!r} version {version} cannot be served: broken")
        model = FakeClassifier() if name == "clf" else TrackedLM(version, delay=0.01)
        opened.append(model)
        return model

    manager = ModelManager(repo, opener, VersionPolicy.parse("specific:1"))
    server = start_server(models=[], manager=manager)
    server.call(manager.load_all())
    yield server, manager, opened, repo
    server.stop()


def _generate(target: str, max_tokens: int):
    channel = grpc.insecure_channel(target)
    request = epb.GenerateRequest(
        model="lm", prompt="a", params=epb.SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    return channel, engine_pb2_grpc.EngineServiceStub(channel).Generate(request)


def _infer_version(client, version: str = "") -> str:
    prompt = grpcclient.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"ab"], dtype=object))
    result = client.infer("lm", [prompt], model_version=version, parameters={"max_tokens": 2})
    return result.get_response().model_version


def test_a_new_version_switches_at_once_and_the_old_one_closes_after_its_requests(managed):
    server, manager, opened, _ = managed
    client = grpcclient.InferenceServerClient(server.target)
    (v1,) = [m for m in opened if isinstance(m, TrackedLM)]
    channel, stream = _generate(server.target, max_tokens=60)  # ~0.6 s on version 1
    with channel:
        first = next(stream)
        client.load_model(
            "lm", config=json.dumps({"version_policy": {"specific": {"versions": [2]}}})
        )
        assert _infer_version(client) == "2"  # new requests: the new version, at once
        assert not client.is_model_ready("lm", "1") and client.is_model_ready("lm", "2")
        assert not v1.closed  # still streaming on it
        rest = list(stream)
    assert 1 + len(rest) == 60 and rest[-1].finish_reason == epb.FINISH_REASON_LENGTH
    assert first.text and all(r.request_id == first.request_id for r in rest)
    deadline = time.monotonic() + 5
    while not v1.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert v1.closed  # freed once its last request finished
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("lm", "1")] == "UNAVAILABLE" and index[("lm", "2")] == "READY"


def test_a_latest_policy_serves_several_versions_and_a_request_picks_one(managed):
    server, manager, opened, _ = managed
    client = grpcclient.InferenceServerClient(server.target)
    client.load_model("lm", config=json.dumps({"version_policy": {"latest": {"num_versions": 2}}}))
    assert client.is_model_ready("lm", "1") and client.is_model_ready("lm", "2")
    assert _infer_version(client, "1") == "1" and _infer_version(client) == "2"
    config = client.get_model_config("lm").config
    assert config.version_policy.latest.num_versions == 2
    assert sorted(client.get_model_metadata("lm").versions) == ["1", "2"]
    v1 = next(m for m in opened if isinstance(m, TrackedLM) and m.card.version == 1)
    assert not v1.closed  # kept: unchanged and still selected


def test_unload_makes_the_model_not_ready_everywhere_and_load_brings_it_back(managed):
    server, _, opened, _ = managed
    client = grpcclient.InferenceServerClient(server.target)
    client.unload_model("clf")
    assert not client.is_model_ready("clf")
    with grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        answer = check(health_pb2.HealthCheckRequest(service="clf"))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        text = grpcclient.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=object))
        with pytest.raises(grpcclient.InferenceServerException) as info:
            client.infer("clf", [text])
        assert (
            info.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in info.value.message()
        )
        client.load_model("clf")
        assert client.is_model_ready("clf")
        answer = check(health_pb2.HealthCheckRequest(service="clf"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert client.infer("clf", [text]).as_numpy("label")[0]


def test_a_failed_reload_keeps_the_versions_that_serve(managed):
    server, _, _, repo = managed
    client = grpcclient.InferenceServerClient(server.target)
    (repo / "lm" / "3").mkdir()
    (repo / "lm" / "3" / "manifest.json").write_text("{}")
    (repo / "lm" / "3" / "broken").write_text("")
    with pytest.raises(grpcclient.InferenceServerException) as info:
        client.load_model(
            "lm", config=json.dumps({"version_policy": {"specific": {"versions": [3]}}})
        )
    assert "broken" in info.value.message()
    assert client.is_model_ready("lm", "1") and _infer_version(client) == "1"


def test_statistics_count_the_requests_each_version_served(managed):
    server, _, _, _ = managed
    client = grpcclient.InferenceServerClient(server.target)
    text = grpcclient.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array([b"a", b"bb", b"ccc"], dtype=object))
    for _ in range(4):
        client.infer("clf", [text])
    empty = grpcclient.InferInput("text", [1], "BYTES")
    empty.set_data_from_numpy(np.array([b""], dtype=object))
    with pytest.raises(grpcclient.InferenceServerException):
        client.infer("clf", [empty])
    (stats,) = client.get_inference_statistics("clf").model_stats
    assert (stats.name, stats.version) == ("clf", "1")
    assert stats.inference_stats.success.count == 4 and stats.inference_stats.fail.count == 1
    assert stats.inference_count == 12
    assert stats.inference_stats.queue.count == 4 and stats.inference_stats.compute_infer.count == 4
    assert stats.inference_stats.success.ns >= stats.inference_stats.compute_infer.ns > 0
    assert stats.last_inference > 0
    everything = client.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in everything} == {("clf", "1"), ("lm", "1")}


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("latest:3", VersionPolicy(latest=3)),
        ("specific:3,1", VersionPolicy(specific=(1, 3))),
        ("all", VersionPolicy(all=True)),
    ],
)
def test_version_policies_parse_and_select(text, policy):
    assert VersionPolicy.parse(text) == policy
    assert policy.describe() == VersionPolicy.parse(policy.describe()).describe()
    selected = policy.select([1, 2, 3, 4])
    assert selected == {"latest:3": [2, 3, 4], "specific:3,1": [1, 3], "all": [1, 2, 3, 4]}[text]


@pytest.mark.parametrize("text", ["latest:0", "specific:", "newest", "all:2", "latest:x"])
def test_a_bad_version_policy_says_what_is_accepted(text):
    with pytest.raises(VersionPolicyError, match="latest:N"):
        VersionPolicy.parse(text)
