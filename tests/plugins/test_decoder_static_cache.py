"""``GPT.forward_static``: the torch runtime's decode step agrees with the ordinary forward."""

from __future__ import annotations

import torch

from plugins.decoder_lm.model import GPT, GPT2_SMALL, GPTConfig

CONFIG = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=16)


def _cache(batch: int, fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A static cache of 32 positions + scratch, filled with stale values."""
    shape = (batch, CONFIG.n_head, CONFIG.block_size + 1, CONFIG.head_dim)
    return [(torch.full(shape, fill), torch.full(shape, -fill)) for _ in range(CONFIG.n_layer)]


@torch.no_grad()
def test_prefill_and_decode_through_a_stale_static_cache_match_forward():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    lens = torch.tensor([5, 2, 7])
    ids = torch.randint(2, 100, (3, 7))
    positions = torch.arange(7).expand(3, 7)
    cache = _cache(3, fill=3.0)  # stale keys from an earlier request must never be read
    logits = model.forward_static(ids, positions, cache, positions.clone(), window=7)
    mask = (torch.arange(7)[None] < lens[:, None]).long()
    reference, _ = model(ids, positions, mask)
    for row, n in enumerate(lens.tolist()):
        torch.testing.assert_close(logits[row, :n], reference[row, :n])
    # One decode step; row 1 is a padding row that writes to the scratch position.
    nxt = torch.randint(2, 100, (3, 1))
    write = lens[:, None].clone()
    write[1, 0] = CONFIG.block_size
    before = [k[1, :, : CONFIG.block_size].clone() for k, _ in cache]
    step = model.forward_static(nxt, lens[:, None], cache, write, window=8)
    for row in (0, 2):
        full = torch.cat([ids[row, : lens[row]], nxt[row]])[None]
        torch.testing.assert_close(step[row, 0], model(full)[0][0, -1])
    assert all(k[1, :, : CONFIG.block_size].equal(b) for (k, _), b in zip(cache, before))


def test_the_gpt2_small_preset_has_gpt2_smalls_shape():
    with torch.device("meta"):
        model = GPT(GPTConfig(**GPT2_SMALL))
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (12, 768, 1024)
    assert 90e6 < model.num_params() < 95e6  # 124M with GPT-2's 50257 tokens; ours are 8192
