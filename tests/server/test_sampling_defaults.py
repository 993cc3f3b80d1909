"""One set of sampling defaults on every path; `engine client generate` reaches every wire field."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from engine import sampling_defaults as defaults
from engine.cli import app
from engine.proto import engine_pb2 as pb
from engine.runtime.sampling_params import SamplingParams
from engine.server import params as wire

VOCAB = 8192


def _fields(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)


def _from_client_cli(monkeypatch, *flags: str) -> pb.SamplingParams:
    """Run `engine client generate` against a stub that keeps the request's params."""
    from engine import client

    seen: list[pb.SamplingParams] = []

    def fake_stream(self, model, prompt, **params):
        seen.append(client.sampling_params(**params))
        return iter(())

    monkeypatch.setattr(client.EngineClient, "generate_stream", fake_stream)
    result = CliRunner().invoke(app, ["client", "generate", "lm", "def f(", *flags])
    assert result.exit_code == 0, result.output
    return seen[0]


def _from_generate_cli(monkeypatch, tmp_path, *flags: str) -> SamplingParams:
    """Run `engine generate` with a stub engine that keeps the request's params."""
    from engine import cli_runtime

    seen: list[SamplingParams] = []

    class Stub:
        async def generate(self, prompt, params):
            seen.append(params)
            return
            yield

        def close(self):
            pass

    monkeypatch.setattr(cli_runtime, "_open", lambda *args: Stub())
    result = CliRunner().invoke(app, ["generate", "def f(", "--repo", str(tmp_path), *flags])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_the_defaults_are_the_documented_ones():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (
        defaults.MAX_TOKENS,
        defaults.TEMPERATURE,
        defaults.TOP_P,
        defaults.TOP_K,
    )
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (64, 0.8, 0.95, 0)


def test_python_api_wire_kserve_and_both_clis_agree(monkeypatch, tmp_path):
    python_api = _fields(SamplingParams())
    engine_v1 = _fields(wire.from_proto(pb.SamplingParams(), VOCAB))
    kserve = _fields(wire.from_kserve({}, VOCAB))
    generate_cli = _fields(_from_generate_cli(monkeypatch, tmp_path))
    client_cli = _fields(wire.from_proto(_from_client_cli(monkeypatch), VOCAB))
    assert engine_v1 == python_api
    assert kserve == python_api
    assert generate_cli == python_api
    assert client_cli == python_api


def test_engine_client_generate_sets_every_sampling_field_of_the_wire(monkeypatch):
    msg = _from_client_cli(
        monkeypatch,
        "--max-tokens", "5",
        "--temperature", "0.5",
        "--top-k", "3",
        "--top-p", "0.9",
        "--min-p", "0.1",
        "--repetition-penalty", "1.1",
        "--presence-penalty", "0.2",
        "--frequency-penalty", "0.3",
        "--seed", "7",
        "--logprobs", "2",
        "--stop", "zz",
        "--stop-token-id", "5",
        "--ignore-eos",
    )  # fmt: skip
    for field in pb.SamplingParams.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.has_presence:
            assert msg.HasField(field.name), field.name
        else:  # repeated fields and the plain bool
            assert value, field.name
    got = wire.from_proto(msg, VOCAB)
    assert (got.max_tokens, got.top_k, got.seed, got.logprobs) == (5, 3, 7, 2)
    assert got.stop == ("zz",) and got.stop_token_ids == (5,) and got.ignore_eos


@pytest.mark.parametrize("bad", [["--top-p", "1.5"], ["--logprobs", "21"], ["--seed", "-1"]])
def test_out_of_range_client_flags_are_refused_before_any_call(monkeypatch, bad):
    result = CliRunner().invoke(app, ["client", "generate", "lm", "x", *bad])
    assert result.exit_code == 2 and "Traceback" not in result.output
