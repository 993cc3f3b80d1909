"""Optimum's ORTModelForCausalLM baseline makes the engine's tokens on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bare_loop import greedy, load_session
from bench.baselines.base import Unavailable
from tests.runtime import conftest as runtime
from tests.runtime.conftest import MODEL

lm_repo, lm_torch_repo = runtime.lm_repo, runtime.lm_torch_repo

NEW = 12
LENGTHS = (5, 1, 23, 11)


def _reason() -> str | None:
    try:
        from bench.baselines.optimum import unavailable_reason
    except ImportError as exc:  # transformers itself is missing
        return str(exc)
    return unavailable_reason("cpu")


REASON = _reason()


def test_an_unusable_install_is_reported_with_its_reason(lm_torch_repo):
    if REASON is None:
        pytest.skip("optimum-onnx is installed here")
    from bench.baselines.optimum import OptimumORT

    with pytest.raises(Unavailable, match="optimum"):
        OptimumORT(lm_torch_repo, MODEL)


@pytest.mark.skipif(REASON is not None, reason=f"optimum baseline unavailable: {REASON}")
def test_greedy_tokens_equal_the_bare_loop_alone_and_left_padded(lm_repo, lm_torch_repo):
    from bench.baselines.optimum import OptimumORT

    rng = np.random.default_rng(2)
    prompts = [rng.integers(4, 8000, n).tolist() for n in LENGTHS]
    session = load_session(lm_repo / MODEL / "1" / "model.onnx", threads=1)
    ort = OptimumORT(lm_torch_repo, MODEL, threads=1)
    try:
        ort.check()
        for p in prompts[:2]:
            tokens, times = ort.generate([p], NEW)
            assert tokens.tolist() == greedy(session, [p], NEW, ort.pad_id).tolist()
            assert len(times) == NEW
        tokens, _ = ort.generate(prompts, NEW)
        assert tokens.tolist() == greedy(session, prompts, NEW, ort.pad_id).tolist()
        records = ort.run(prompts, 3, concurrency=4)
        assert [r.output_tokens for r in records] == [3] * 4
        # a long prompt's row stepping past the context (96) for the batch's longest output
        long, short = rng.integers(4, 8000, 90).tolist(), rng.integers(4, 8000, 5).tolist()
        tokens, _ = ort.generate([long, short], 20)
        assert tokens[0, :6].tolist() == greedy(session, [long], 6, ort.pad_id)[0].tolist()
        assert tokens[1].tolist() == greedy(session, [short], 20, ort.pad_id)[0].tolist()
        assert ort.describe()["optimum-onnx"] == "0.1.0"
    finally:
        ort.close()
