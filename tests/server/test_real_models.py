"""End to end on a real model repository: tiny models trained, exported to ONNX and served.

The server runs as its own process through ``engine.server.cli_commands.serve`` (the path
``engine serve`` takes) and answers the same as the runtime does in process.
"""

from __future__ import annotations

import os
import queue
import re
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from engine.client import EngineClient
from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from exporters.base import ExportOptions
from tests.server.conftest import ServerProcess

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

# Tiny and briefly trained: these tests check serving, not quality. The LM's context is long
# enough that a stream can be cancelled while it is generating.
LM = {
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "block_size": 128,
    "batch_size": 4,
    "eval_windows": 4,
    "steps": 5,
    "warmup_steps": 1,
}
CLASSIFIER = {"d_model": 32, "n_layer": 1, "n_head": 2, "pretrain_steps": 3, "finetune_steps": 5}
GAN = {"steps": 5}


def build_repo(root):
    """Train and export lm, clf and (when its plugin is registered) gan under ``root``."""
    from engine.plugins import architectures, export_formats
    from engine.trainer import train

    onnx = export_formats()["onnx"]
    runs = [("lm", "decoder-lm", LM), ("clf", "text-classifier", CLASSIFIER)]
    if "gan-generator" in architectures():
        runs.append(("gan", "gan-generator", GAN))
    for name, arch, overrides in runs:
        ckpt = train(arch, root / f"ckpt-{name}", overrides=overrides, progress=False)
        onnx.export(ckpt, root / "repo", ExportOptions(name=name, validate=False, progress=False))
    return root / "repo"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A model repository of tiny models, built once for the module.

    Training and exporting take a minute or two on 2 cores; to iterate on the server, build
    one with ``build_repo`` and point ENGINE_TEST_SERVER_REPO at its ``repo`` directory.
    """
    prebuilt = os.environ.get("ENGINE_TEST_SERVER_REPO")
    if prebuilt:
        return Path(prebuilt)
    return build_repo(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(repo):
    proc = ServerProcess("--repo", str(repo), "--grace", "5")
    yield proc
    code = proc.terminate()
    log = proc.stderr()
    proc.kill()
    assert code == 0, log[-2000:]


def _metric(server, name: str, model: str) -> float:
    url = f"http://127.0.0.1:{server.info['metrics_port']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.M)
    assert found, f"{name} for {model} not in /metrics"
    return float(found.group(1))


def test_serving_real_models_never_imports_torch(server):
    assert server.info["torch_loaded"] is False


def test_greedy_generation_matches_the_runtime_in_process(server, repo):
    from engine.runtime import Engine, SamplingParams

    engine = Engine.from_repository(repo, "lm")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = engine.generate_all(["def main("], params)[0]
    engine.close()
    with EngineClient(server.target) as client:
        chunks = list(
            client.generate_stream(
                "lm", "def main(", temperature=0.0, max_tokens=12, ignore_eos=True
            )
        )
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert chunks[-1].usage.completion_tokens == 12


def test_classification_matches_the_runtime_in_process(server, repo):
    import asyncio

    from engine.runtime import Engine

    texts = ["Return the sum of two numbers.", "Open a socket and send bytes."]
    engine = Engine.from_repository(repo, "clf")
    expected = asyncio.run(engine.classify(texts))
    engine.close()
    with EngineClient(server.target) as client:
        got = client.classify("clf", texts)
    for mine, theirs in zip(got, expected):
        assert mine.label == theirs.label
        assert mine.probabilities[theirs.label] == pytest.approx(theirs.score, abs=1e-5)
        assert sum(mine.probabilities.values()) == pytest.approx(1.0, abs=1e-4)


def test_prompt_longer_than_the_context_is_invalid(server):
    with EngineClient(server.target) as client, pytest.raises(Exception) as info:
        client.generate("lm", "x = 1\n" * 200)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context is 128 tokens" in info.value.detail


def test_tritonclient_on_real_models(server):
    tg = pytest.importorskip("tritonclient.grpc")
    client = tg.InferenceServerClient(server.target)
    assert client.is_model_ready("lm") and client.is_model_ready("clf")
    texts = tg.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array([b"Parse an email header.", b"Log a warning."], object))
    probs = client.infer("clf", [texts]).as_numpy("probabilities")
    assert probs.shape[0] == 2
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    prompt = tg.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"import os"], dtype=object))
    params = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    whole = client.infer("lm", [prompt], parameters=params)
    assert whole.as_numpy("completion_tokens")[0] == 8
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("lm", [prompt], parameters=params)
    pieces = []
    while True:
        result, error = responses.get(timeout=30)
        assert error is None, error
        pieces.append(result.as_numpy("text_output")[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    assert b"".join(pieces) == whole.as_numpy("text_output")[0]


def test_cancelling_hundreds_of_real_streams_empties_the_kv_pool(server):
    request = pb.GenerateRequest(
        model="lm", prompt="class Foo:", params=pb.SamplingParams(max_tokens=100, ignore_eos=True)
    )
    gauges = ("engine_kv_blocks_used", "engine_running_requests", "engine_queue_length")
    with grpc.insecure_channel(server.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        calls = [stub.Generate(request) for _ in range(200)]
        next(calls[0])  # generating; the others run beside it or wait their turn
        deadline = time.monotonic() + 60
        while _metric(server, "engine_kv_blocks_used", "lm") == 0:
            assert time.monotonic() < deadline, "no KV block was ever in use"
            time.sleep(0.02)
        for call in calls:
            call.cancel()
    deadline = time.monotonic() + 60  # generous: the machine running the tests may be busy
    while any(_metric(server, name, "lm") for name in gauges):
        left = {name: _metric(server, name, "lm") for name in gauges}
        assert time.monotonic() < deadline, f"left behind after cancelling: {left}"
        time.sleep(0.05)
    assert _metric(server, "engine_kv_blocks_free", "lm") > 0


def test_a_server_out_of_kv_memory_preempts_recomputes_and_reports_it(repo):
    """Through `engine serve`: 8 streams that outgrow a 2-context KV budget all finish, with
    the tokens the runtime gives without memory pressure; preemptions and prefix-cache hits
    (the recomputes find their own blocks) are on /metrics."""
    from engine.runtime import Engine, EngineConfig, SamplingParams

    prompts = [f"def handler_{i}(request):\n    return " for i in range(8)]
    engine = Engine.from_repository(repo, "lm", config=EngineConfig(max_num_seqs=8))
    params = SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate_all(prompts, params)]
    per_block = engine.kv_stats().bytes_per_block
    assert engine.kv_stats().preemptions == 0
    engine.close()
    budget = str(2 * (128 // 16) * per_block)  # two full contexts: 16 blocks for 8 x ~7
    proc = ServerProcess("--repo", str(repo), "--max-num-seqs", "8", "--kv-cache-bytes", budget)
    try:
        request = lambda p: pb.GenerateRequest(  # noqa: E731
            model="lm",
            prompt=p,
            params=pb.SamplingParams(temperature=0.0, max_tokens=90, ignore_eos=True),
        )
        with grpc.insecure_channel(proc.target) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            calls = [stub.Generate(request(p), timeout=300) for p in prompts]
            got = [[t for chunk in call for t in chunk.token_ids] for call in calls]
        assert got == expected
        assert _metric(proc, "engine_preemptions_total", "lm") > 0
        assert _metric(proc, "engine_prefix_cache_hits_total", "lm") > 0
        queries = _metric(proc, "engine_prefix_cache_queries_total", "lm")
        assert queries >= sum(len(engine.encode(p)) for p in prompts)
        assert _metric(proc, "engine_kv_blocks_used", "lm") == 0
        assert _metric(proc, "engine_sequences_running", "lm") == 0
    finally:
        assert proc.terminate() == 0, proc.stderr()[-2000:]
        proc.kill()


def test_sample_images_from_the_real_gan(server):
    with EngineClient(server.target) as client:
        if "gan" not in {m.name for m in client.models()}:
            pytest.skip("the gan-generator plugin is not registered yet")
        response = client.sample_images("gan", [0, 7], seed=3)
    assert list(response.shape) == [1, 8, 8]
    assert all(im.png.startswith(b"\x89PNG") and len(im.pixels) == 64 for im in response.images)
    tg = pytest.importorskip("tritonclient.grpc")
    client = tg.InferenceServerClient(server.target)
    digits = tg.InferInput("digit", [2], "INT64")
    digits.set_data_from_numpy(np.array([0, 7], dtype=np.int64))
    images = client.infer("gan", [digits], parameters={"seed": 3}).as_numpy("image")
    client.close()
    # Both protocols draw the same noise for the same seed.
    np.testing.assert_allclose(
        images.reshape(2, -1), [im.pixels for im in response.images], atol=1e-6
    )


def test_quick_start_serve_and_client_keep_their_output_apart(repo, tmp_path):
    """As the README runs them: server in the background, its log in a file; the client waits."""
    import json
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--repo", str(repo), "--models", "lm",
         "--port", str(port), "--no-metrics", "--log-file", str(log)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        # started at once: --wait covers the server's start-up (no fixed sleep)
        client = run_cli(
            "client", "generate", "lm", "def main(", "--max-tokens", "8", "--temperature", "0",
            "--target", f"127.0.0.1:{port}", "--wait", "120",
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err[-2000:]
    assert client.stdout.endswith("\n") and '"event"' not in client.stdout + client.stderr
    assert f"serving lm on grpc://127.0.0.1:{port}" in err and '"event"' not in err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e.get("model") == "lm" for e in events), events
    assert events[-1]["event"] == "server stopped"


def test_client_wait_gives_up_with_one_line(tmp_path):
    import socket

    from tests.conftest import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    result = run_cli("client", "models", "--target", f"127.0.0.1:{port}", "--wait", "1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: UNAVAILABLE: no server at 127.0.0.1:{port} after waiting 1 s"
    ]
