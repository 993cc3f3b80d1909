"""The runtime on int8 graphs: a request's tokens do not depend on the batch it runs in.

The tiny LM's fp32 version, with both graphs put through the export's int8 stage
(``exporters.quantize.quantize_graph``), served by the same engine as fp32.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from engine.repository import read_manifest, write_manifest
from engine.runtime import Engine, EngineConfig, SamplingParams
from exporters.quantize import quantize_graph
from tests.runtime.conftest import MODEL

INT8 = "tiny-lm-int8"


@pytest.fixture(scope="module")
def int8_repo(lm_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("int8-repo")
    dest = repo / INT8 / "1"
    shutil.copytree(lm_repo / MODEL / "1", dest)
    manifest = read_manifest(dest)
    for graph in manifest.graphs.values():
        graph["int8"] = quantize_graph(dest / graph["file"])
    manifest.name, manifest.precision = INT8, "int8"
    write_manifest(dest, manifest)
    return repo


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(4, 8000, n).tolist() for n in (3, 17, 9, 40, 1, 26)]


def test_a_seeded_int8_request_is_the_same_alone_and_among_16_mixed_requests(int8_repo, prompts):
    engine = Engine.from_repository(int8_repo, INT8, threads=1, config=EngineConfig())
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_tokens=30, ignore_eos=True)
    alone = engine.generate_all([prompts[1]], target)[0].token_ids
    others = [
        SamplingParams(temperature=0.0, max_tokens=10),
        SamplingParams(temperature=1.2, top_k=20, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, max_tokens=5),
        SamplingParams(temperature=1.0, seed=9, max_tokens=35),
    ]
    ids = []
    for i in range(16):
        params = target if i == 7 else others[i % len(others)]
        ids.append(engine.add_request(prompts[1] if i == 7 else prompts[i % len(prompts)], params))
    final = {}
    while engine.has_unfinished:
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[ids[7]].token_ids == alone
    assert (
        engine.generate_all([prompts[1]], SamplingParams(temperature=0.9, seed=78, max_tokens=30))[
            0
        ].token_ids
        != alone
    )


def test_int8_greedy_tokens_alone_equal_batched_and_stay_close_to_fp32(int8_repo, lm_repo, prompts):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = Engine.from_repository(int8_repo, INT8, threads=1, config=EngineConfig())
    batched = [o.token_ids for o in engine.generate_all(prompts, greedy)]
    alone = [engine.generate_all([p], greedy)[0].token_ids for p in prompts]
    assert batched == alone
    fp32 = Engine.from_repository(lm_repo, MODEL, threads=1, config=EngineConfig())
    reference = [o.token_ids for o in fp32.generate_all(prompts, greedy)]
    first = [b[0] == r[0] for b, r in zip(batched, reference)]  # before any divergence compounds
    assert sum(first) >= len(prompts) - 1
    sizes = {g["file"]: g["int8"] for g in read_manifest(int8_repo / INT8 / "1").graphs.values()}
    assert all(s["bytes_int8"] < 0.4 * s["bytes_fp32"] for s in sizes.values())


def test_an_fp32_export_quantized_afterwards_has_no_fp32_weights_and_one_tied_table(int8_repo):
    """The fp32 export stores the tied table once (the head reads its Transpose) and runs the
    paged graph's projections as Gemm; quantizing it afterwards undoes both first."""
    import onnx

    dest = int8_repo / INT8 / "1"
    for graph in read_manifest(dest).graphs.values():
        q = graph["int8"]
        assert q["unshared_tables"] and [g["shared_with_head"] for g in q["gathers"]] == [True]
        model = onnx.load(str(dest / graph["file"]))
        floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        left = [
            n.name
            for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in floats
        ]
        assert not left, left
