"""The decoder-lm architecture: it learns, its KV-cache paths agree, its export contract holds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from engine import checkpoint
from engine.plugins import get_architecture
from engine.serving_contract import KV_INPUTS
from engine.trainer import train

TINY = {  # ~250k tokens: a few seconds uncontended; the model clearly beats unigram by then
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "block_size": 32,
    "batch_size": 8,
    "steps": 300,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 20,
    "eval_windows": 64,
}
ATOL = 1e-4  # fp32, same math in a different order


@pytest.fixture(scope="module")
def arch():
    return get_architecture("decoder-lm")[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train the tiny config once through the engine's trainer; return the checkpoint dir."""
    out = tmp_path_factory.mktemp("decoder-lm") / "ckpt"
    # One thread: on an idle 2-core machine it costs 1.5x here, but on a busy one two intra-op
    # threads spin-wait and this run took 20x longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train("decoder-lm", out, overrides=TINY, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_and_config(arch):
    """A random-weight model small enough to compare paths exactly."""
    torch.manual_seed(0)
    config = arch.config_class(**{**TINY, "vocab_size": 512})
    return arch.build_model(config).eval(), config


def test_tiny_config_beats_unigram_and_samples(tiny_run, arch):
    metrics = json.loads((tiny_run / checkpoint.METRICS).read_text())
    assert metrics["gain_nats"] > 0.2, metrics  # 0.44 measured
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["heldout_ce"]))
    assert (tiny_run / "tokenizer.json").exists()
    assert arch.artifact_files(tiny_run) == [tiny_run / "tokenizer.json"]

    _, config, model = checkpoint.load(tiny_run)
    options = {"prompt": "import", "max_tokens": 12, "seed": 1}
    text = arch.sample(model, tiny_run, config, options)
    assert text.startswith("import") and len(text) > len("import")
    assert text == arch.sample(model, tiny_run, config, options)  # seeded: repeatable
    meta = arch.serving_metadata(config, tiny_run)
    assert meta["eos_token_id"] == 0 and meta["pad_token_id"] == 1
    assert meta["context_length"] == 32 and meta["head_dim"] == 32


@torch.no_grad()
def test_incremental_decoding_matches_full_forward(model_and_config):
    model, _ = model_and_config
    ids = torch.randint(4, 512, (3, 20))
    full, _ = model(ids)
    logits, past = model(ids[:, :12])  # prefill, then one token at a time
    steps = [logits]
    for t in range(12, 20):
        logits, past = model(ids[:, t : t + 1], past_kv=past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert past[0][0].shape == (3, 2, 20, 32)


@torch.no_grad()
def test_past_length_zero_equals_no_cache(model_and_config):
    model, _ = model_and_config
    ids = torch.randint(4, 512, (2, 7))
    empty = [(torch.zeros(2, 2, 0, 32), torch.zeros(2, 2, 0, 32)) for _ in range(2)]
    mask = torch.ones(2, 7, dtype=torch.long)
    with_empty, present = model(ids, torch.arange(7).expand(2, 7), mask, empty)
    torch.testing.assert_close(with_empty, model(ids)[0], atol=ATOL, rtol=0)
    assert present[1][1].shape == (2, 2, 7, 32)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(model_and_config):
    model, _ = model_and_config
    rows = [torch.randint(4, 512, (n,)) for n in (10, 6, 3)]
    S = max(len(r) for r in rows)
    ids = torch.ones(3, S, dtype=torch.long)  # pad id
    mask = torch.zeros(3, S, dtype=torch.long)
    pos = torch.zeros(3, S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r) :], mask[i, S - len(r) :] = r, 1
        pos[i, S - len(r) :] = torch.arange(len(r))
    logits, past = model(ids, pos, mask)
    assert torch.isfinite(logits).all()  # fully masked pad queries must not produce NaN
    nxt = torch.randint(4, 512, (3, 1))  # and one cached decode step on the padded batch
    step, _ = model(
        nxt, pos[:, -1:] + 1, torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), past
    )
    for i, r in enumerate(rows):
        alone, _ = model(torch.cat([r, nxt[i]])[None])
        torch.testing.assert_close(logits[i, S - len(r) :], alone[0, :-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("batch,seq,past", [(1, 5, 0), (3, 4, 9), (4, 1, 16), (2, 3, 40)])
def test_the_paged_kv_inplace_graph_matches_the_default_path(
    arch, model_and_config, batch, seq, past
):
    """Attending through block tables into a shuffled pool = attending over each row's cache."""
    model, config = model_and_config
    x = arch.example_inputs(config, batch, seq, past, seed=3, variant="kv_inplace")
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    pools = [(t[f"cache.{i}.key"], t[f"cache.{i}.value"]) for i in range(config.n_layer)]
    logits, new = model.forward_paged(*(t[n] for n in KV_INPUTS), pools)
    # the same cache laid out densely per row: its blocks in table order
    table = t["block_table"]
    width = table.shape[1] * config.kv_block_size

    def dense(pool):  # (P, H, bs, D) -> (B, H, nb * bs, D)
        return pool[table].permute(0, 2, 1, 3, 4).reshape(batch, config.n_head, width, -1)

    past_kv = [(dense(k), dense(v)) for k, v in pools]
    valid = t["block_mask"].reshape(batch, width).long()
    new_mask = t["causal_mask"][:, -1].long()  # the last new token sees every real one
    attention_mask = torch.cat([valid, new_mask], dim=1)
    ref, present = model(t["input_ids"], t["position_ids"], attention_mask, past_kv)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    for (k, v), (pk, pv) in zip(new, present):
        torch.testing.assert_close(k, pk[:, :, width:], atol=ATOL, rtol=0)
        torch.testing.assert_close(v, pv[:, :, width:], atol=ATOL, rtol=0)


def _axis_sizes(spec_shape, actual_shape, sizes):
    assert len(spec_shape) == len(actual_shape)
    for want, got in zip(spec_shape, actual_shape):
        if isinstance(want, str):
            assert sizes.setdefault(want, got) == got, (want, sizes[want], got)
        else:
            assert want == got


@torch.no_grad()
@pytest.mark.parametrize("variant", ["default", "kv_inplace"])
@pytest.mark.parametrize("batch,seq,past", [(1, 6, 0), (3, 5, 7)])
def test_export_contract_agrees(arch, model_and_config, variant, batch, seq, past):
    model, config = model_and_config
    assert variant in arch.export_variants(config)
    sig = arch.export_signature(config, variant)
    x = arch.example_inputs(config, batch, seq, past, seed=1, variant=variant)
    assert list(x) == sig.input_names()
    sizes: dict[str, int] = {}
    for spec in sig.inputs:
        assert x[spec.name].dtype == np.dtype(spec.dtype), spec.name
        _axis_sizes(spec.shape, x[spec.name].shape, sizes)
    if batch > 1:  # later rows are padded, so validation covers uneven batches
        mask = x["attention_mask"] if variant == "default" else x["causal_mask"][:, -1]
        assert (mask == 0).any()
    outputs = arch.export_module(model, config, variant)(*(torch.from_numpy(v) for v in x.values()))
    assert len(outputs) == len(sig.outputs)
    for spec, out in zip(sig.outputs, outputs):
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), spec.name
        _axis_sizes(spec.shape, tuple(out.shape), sizes)


def _gpt2_twin(transformers, config):
    """An untrained ``GPT2LMHeadModel`` of the same shape as the decoder (tanh GELU, as ours)."""
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
        )
    ).eval()


def test_gpt2_mapping_reproduces_transformers_logits(model_and_config):
    transformers = pytest.importorskip("transformers")
    from plugins.decoder_lm.model import to_gpt2_state_dict

    model, config = model_and_config
    hf = _gpt2_twin(transformers, config)
    missing, unexpected = hf.load_state_dict(to_gpt2_state_dict(model.state_dict()), strict=False)
    assert not unexpected and all(".attn.bias" in m or "masked_bias" in m for m in missing)
    ids = torch.randint(4, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=ATOL, rtol=0)


def test_gpt2_mapping_takes_a_saved_checkpoint_that_kept_one_tied_name(model_and_config, tmp_path):
    """A checkpoint on disk keeps one of the tied embedding/head names; both come back.

    ``save_model`` drops the duplicate of a tied tensor, so the file holds only one of
    ``lm_head.weight`` / ``transformer.wte.weight``; the mapping once used ``setdefault``, whose
    default (the missing name) is evaluated first: ``KeyError: 'transformer.wte.weight'``.
    """
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_model

    from plugins.decoder_lm.model import to_gpt2_state_dict

    model, config = model_and_config
    save_model(model, str(tmp_path / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in saved) != ("transformer.wte.weight" in saved)  # kept one
    for kept in ("lm_head.weight", "transformer.wte.weight"):
        other = {"lm_head.weight": "transformer.wte.weight"}.get(kept, "lm_head.weight")
        state = {k: v for k, v in model.state_dict().items() if k != other}
        mapped = to_gpt2_state_dict(state)
        assert torch.equal(mapped["lm_head.weight"], mapped["transformer.wte.weight"])
    hf = _gpt2_twin(transformers, config)
    hf.load_state_dict(to_gpt2_state_dict(saved), strict=False)
    ids = torch.randint(4, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~7 min on an idle 2-core machine; a busy one took over 15
def test_default_config_meets_quality_bar(arch, tmp_path):
    out = train("decoder-lm", tmp_path / "ckpt", progress=False)
    metrics = json.loads((out / checkpoint.METRICS).read_text())
    assert metrics["quality"]["passed"], metrics["quality"]["summary"]
    assert metrics["gain_nats"] >= 2.0
    default = dataclasses.asdict(arch.config_class())
    assert json.loads((out / checkpoint.CONFIG).read_text())["config"] == default
