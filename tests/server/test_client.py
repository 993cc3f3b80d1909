"""The Python client and the `engine client ...` command functions against a live server."""

from __future__ import annotations

import io
import time

import grpc
import pytest

from engine.client import ClientError, EngineClient
from engine.errors import EngineError
from engine.server.cli_commands import (
    Connection,
    client_classify,
    client_generate,
    client_models,
    client_sample_images,
)
from tests.server.conftest import start_server
from tests.server.fakes import FakeLM


def test_client_generate_streams_to_the_terminal(server):
    out = io.StringIO()
    text = client_generate(
        Connection(server.target), "lm", "hello", max_tokens=7, temperature=0, out=out
    )
    assert len(text) == 7 and out.getvalue() == text + "\n"


def test_client_classify_prints_label_and_probability(server):
    out = io.StringIO()
    results = client_classify(Connection(server.target), "clf", ["abc", "hello"], out=out)
    lines = out.getvalue().splitlines()
    assert [line.split("\t")[0] for line in lines] == [r.label for r in results]
    assert lines[1].endswith("hello")


def test_client_sample_images_writes_pngs(server, tmp_path):
    out = io.StringIO()
    paths = client_sample_images(
        Connection(server.target), "gan", [1, 2, 3], seed=5, out_dir=tmp_path, out=out
    )
    assert [p.name for p in paths] == ["digit1_0.png", "digit2_1.png", "digit3_2.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert out.getvalue().splitlines()[-1] == "seed 5"


def test_client_models_lists_every_model(server):
    out = io.StringIO()
    client_models(Connection(server.target), out=out)
    assert sorted(line.split("\t")[0] for line in out.getvalue().splitlines()) == [
        "clf",
        "gan",
        "lm",
    ]


def test_errors_are_one_line_engine_errors(server, tmp_path):
    with pytest.raises(ClientError) as info:
        client_generate(Connection(server.target), "nope", "x", out=io.StringIO())
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert str(info.value).startswith("NOT_FOUND: model 'nope' is not served")
    assert isinstance(info.value, EngineError)
    with pytest.raises(EngineError, match="auth token file"):
        client_models(Connection(server.target, token_file=tmp_path / "missing"), out=io.StringIO())


def test_stopping_a_stream_early_cancels_the_generation():
    lm = FakeLM(delay=0.02, context_length=10_000)
    srv = start_server([lm])
    try:
        with EngineClient(srv.target) as client:
            stream = client.generate_stream("lm", "abc", max_tokens=1000)
            next(stream)
            stream.close()  # the generator's finally cancels the call
        deadline = time.monotonic() + 10
        while srv.run(lambda: len(lm.aborted)) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.run(lambda: len(lm.aborted)) == 1
        assert srv.run(lm.kv_blocks_used) == 0
    finally:
        srv.stop()


def test_every_client_command_takes_the_connection_options(server, monkeypatch):
    """The options are declared once (engine.cli.CONNECTION_OPTIONS) and reach each command."""
    from typer.testing import CliRunner

    import engine.server.cli_commands as commands
    from engine.cli import CONNECTION_OPTIONS, app

    seen = []
    for name in ("client_generate", "client_classify", "client_sample_images", "client_models"):
        monkeypatch.setattr(commands, name, lambda conn, *a, **k: seen.append(conn))
    flags = ["--target", server.target, "--token", "t0k", "--tls", "--timeout", "3", "--wait", "2"]
    for command in (
        ["generate", "lm", "hi"],
        ["classify", "clf", "a"],
        ["sample-images", "gan", "1"],
        ["models"],
    ):
        result = CliRunner().invoke(app, ["client", *command, *flags])
        assert result.exit_code == 0, result.output
    expected = Connection(server.target, "t0k", None, True, None, 3.0, 2.0)
    assert seen == [expected] * 4
    assert [name for name, _, _ in CONNECTION_OPTIONS] == [
        "target", "token", "auth_token_file", "tls", "tls_ca", "timeout", "wait"
    ]  # fmt: skip


def test_the_client_commands_print_through_the_cli(server):
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, ["client", "models", "--target", server.target, "--wait", "5"])
    assert result.exit_code == 0, result.output
    assert sorted(line.split("\t")[0] for line in result.output.splitlines()) == [
        "clf",
        "gan",
        "lm",
    ]


def test_every_sampling_value_the_client_sends_reaches_the_runtime():
    """Client and server read the sampling scalars off the .proto: none is dropped on the way."""
    from engine.client import sampling_params
    from engine.proto import engine_pb2 as pb
    from engine.server.params import from_proto

    sent = dict(
        temperature=0.5, top_k=7, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        presence_penalty=0.2, frequency_penalty=0.3, max_tokens=9, seed=11, logprobs=2,
    )  # fmt: skip
    declared = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence}
    assert set(sent) == declared  # a new optional field in the .proto needs a value here
    got = from_proto(sampling_params(**sent), vocab_size=100)
    assert {name: getattr(got, name) for name in sent} == pytest.approx(sent)
