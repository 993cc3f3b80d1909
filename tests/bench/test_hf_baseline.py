"""The Hugging Face ``generate`` baseline makes the engine's tokens on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bare_loop import greedy, load_session
from bench.baselines.base import Unavailable
from tests.runtime import conftest as runtime
from tests.runtime.conftest import MODEL

# The runtime tests' session fixtures: the same tiny LM as ONNX, as torch and as a checkpoint.
lm_repo, lm_torch_repo = runtime.lm_repo, runtime.lm_torch_repo
lm_checkpoint = runtime.lm_checkpoint

pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[bench]'")

NEW = 12
LENGTHS = (5, 1, 23, 11)  # a batch of 4 needs left padding


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(2)
    return [rng.integers(4, 8000, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def hf(lm_torch_repo):
    from bench.baselines.hf import HFGenerate

    baseline = HFGenerate(lm_torch_repo, MODEL, threads=1)
    yield baseline
    baseline.close()


@pytest.fixture(scope="module")
def session(lm_repo):
    return load_session(lm_repo / MODEL / "1" / "model.onnx", threads=1)


def test_greedy_tokens_equal_the_bare_loop_alone_and_left_padded(hf, session, prompts):
    for p in prompts:
        tokens, times = hf.generate([p], NEW)
        assert tokens.tolist() == greedy(session, [p], NEW, hf.pad_id).tolist()
        assert len(times) == NEW and times == sorted(times)  # one stamp per generated token
    tokens, times = hf.generate(prompts, NEW)
    expected = greedy(session, prompts, NEW, hf.pad_id)
    assert tokens.tolist() == expected.tolist()
    assert len(np.unique(expected)) > 20 and len(times) == NEW


def test_a_static_batch_stepping_past_the_context_keeps_every_requests_tokens(hf, session):
    """A batch runs until its longest output ends: the long prompt's row steps on past the
    context (the tiny LM's is 96), which must not fail the batch or change any kept token."""
    rng = np.random.default_rng(5)
    long, short = rng.integers(4, 8000, 90).tolist(), rng.integers(4, 8000, 5).tolist()
    tokens, _ = hf.generate([long, short], 20)  # the long row reaches position 109
    assert tokens[0, :6].tolist() == greedy(session, [long], 6, hf.pad_id)[0].tolist()
    assert tokens[1].tolist() == greedy(session, [short], 20, hf.pad_id)[0].tolist()


def test_run_records_one_timestamp_per_token_per_request(hf, prompts):
    records = hf.run(prompts, 4, concurrency=2)
    assert [r.prompt_tokens for r in records] == list(LENGTHS)
    assert all(r.output_tokens == 4 and r.start < r.token_times[0] for r in records)
    assert records[0].token_times == records[1].token_times  # one batch, shared stamps
    assert records[2].start >= records[1].token_times[-1]  # batch after batch
    assert hf.describe()["transformers"]


def test_a_checkpoint_loads_the_same_weights_and_onnx_alone_is_refused(
    hf, lm_checkpoint, lm_repo, prompts
):
    from bench.baselines.hf import HFGenerate

    direct = HFGenerate(checkpoint=lm_checkpoint, threads=1)
    assert direct.generate(prompts, 3)[0].tolist() == hf.generate(prompts, 3)[0].tolist()
    with pytest.raises(Unavailable, match="--format torch"):
        HFGenerate(lm_repo, MODEL)


def test_an_imported_gpt2_is_benchmarked_against_hf_on_its_own_dir(hf_repo, hf_gpt2, tmp_path):
    """`engine bench run` on an imported GPT-2: the hf baseline loads the directory it came
    from (the manifest records it) and makes the served model's greedy tokens."""
    import json

    from tests.conftest import run_cli

    quick = ["--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--threads", "1"]
    args = ["bench", "run", "--repo", str(hf_repo), "--model", "gpt2", "--concurrency", "1,2"]
    result = run_cli(
        *args, "--baselines", "grpc,hf", *quick, "--out", str(tmp_path), "--no-progress",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {(r["label"], r["concurrency"]): r for r in report["runs"]}
    assert set(runs) == {(b, c) for b in ("grpc", "hf") for c in (1, 2)}
    for c in (1, 2):
        assert runs[("hf", c)]["same_tokens"]["identical"] == 4, runs[("hf", c)]
    baselines = json.dumps(report)
    assert str(hf_gpt2.resolve()) in baselines  # the weights hf loaded: the directory itself


def test_the_static_cache_baseline_makes_the_same_tokens(hf, lm_torch_repo, prompts):
    """hf-static: transformers' static cache (compiled on CUDA only) against the dynamic one."""
    from bench.baselines.hf import HFStaticCompiled

    assert HFStaticCompiled.why_unavailable("cpu") is None
    static = HFStaticCompiled(lm_torch_repo, MODEL, threads=1)
    try:
        assert static.warmup_each_load  # a compiled step is specialised to its batch size
        tokens, times = static.generate(prompts, NEW)
        assert tokens.tolist() == hf.generate(prompts, NEW)[0].tolist() and len(times) == NEW
        described = static.describe()
        assert described["cache"] == "static" and described["compiled"] is False  # CPU
    finally:
        static.close()


def test_a_dtype_by_name_reaches_the_model_and_a_bad_one_is_refused(lm_torch_repo):
    from bench.baselines.hf import HFGenerate

    half = HFGenerate(lm_torch_repo, MODEL, threads=1, dtype="bfloat16")
    assert half.describe()["dtype"] == "bfloat16"
    half.close()
    with pytest.raises(Unavailable, match="unknown dtype 'int8'"):
        HFGenerate(lm_torch_repo, MODEL, threads=1, dtype="int8")
