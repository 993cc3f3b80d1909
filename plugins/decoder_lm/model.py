"""A GPT-2-shaped decoder: pre-LayerNorm blocks, learned positions, tied embeddings, a KV cache.

Parameter names follow nanoGPT (``transformer.h.{i}.attn.c_attn`` as ``nn.Linear``), so the
weights map one-to-one onto Hugging Face's ``GPT2LMHeadModel`` (see :func:`to_gpt2_state_dict`).
Attention is an explicit matmul + softmax rather than SDPA so the ONNX graph stays plain.

Two inference paths share the weights:

* :meth:`GPT.forward` - the standard path. Past keys/values are concatenated with the new ones
  and returned as ``present`` (the ``default`` export variant).
* :meth:`GPT.forward_paged` - the ``kv_inplace`` export variant. The cache is the runtime's
  pool of fixed-size blocks (vLLM's paged KV cache), read where it lies and never copied; a
  block table says which blocks hold each row's tokens. The graph returns only the new tokens'
  keys/values and the runtime writes them into the pool. The masks (a prefill chunk pads
  prompts of different lengths within the chunk) and each pool block's row come as inputs,
  computed by the runtime from its block tables (engine/paged_inputs.py).
* :meth:`GPT.forward_static` - the torch runtime's decode step (engine/runtime/torch_runner.py).
  The cache is a static buffer the step writes into in place (index_put_), then attends over a
  fixed window of it: no shape depends on the data and nothing syncs with the host, so the step
  can be captured once in a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, H, T, D)


@dataclass
class GPTConfig:
    """Model shape; the defaults are the default training run (see arch.DecoderLMConfig)."""

    block_size: int = 128  # context length: long enough for a function body, cheap on 2 cores
    vocab_size: int = 8192  # the shared stdlib BPE tokenizer's size
    n_layer: int = 4  # 5.3M parameters: passes the quality bar in ~7 min on 2 idle cores
    n_head: int = 4  # head_dim 64: a multiple of 8 for fp16 / tensor-core kernels
    n_embd: int = 256
    dropout: float = 0.0  # the default run sees half an epoch: nothing to regularise yet
    # Tokens per block of the kv_inplace graph's paged KV cache (a graph shape, not a weight):
    # vLLM's default, and at head_dim 64 in fp32 one block of one head is a 4 KiB page.
    kv_block_size: int = 16

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head


# GPT-2 small's shape (124M parameters with GPT-2's 50257-token vocabulary, ~92M with our 8192):
# the model the GPU benchmark (bench/gpu.sh) serves. As training overrides:
#   engine train decoder-lm --config n_layer=12 --config n_head=12 --config n_embd=768 \
#       --config block_size=1024
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}
# GPT-2 medium's shape (355M parameters with GPT-2's vocabulary, ~311M with ours): the larger
# model bench/gpu.sh serves.
GPT2_MEDIUM = {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024}


def _masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``allowed``; fully masked rows stay finite (uniform).

    A large finite negative (not -inf) replaces masked scores, so a query that may attend to
    nothing - a left-pad token - yields a uniform row instead of NaN.
    """
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (GPT-2's ``c_attn``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, S, C) -> (B, H, S, D)
        q, k, v = (t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return q * (1.0 / math.sqrt(self.head_dim)), k, v

    def _qkv_flat(self, x: torch.Tensor, B: int, S: int) -> tuple:
        """``_qkv`` of (B*S, C) tokens, the 1/sqrt(D) query scale folded into the weights.

        A 2-D input makes each projection one ``Gemm`` with its bias (a 3-D one exports as
        ``MatMul`` + ``Add``); the scale, applied to the weights (constants), folds away at
        export instead of costing a ``Mul`` per layer and step.
        """
        H, D = self.n_head, self.head_dim
        scale = torch.ones(3 * H * D, dtype=x.dtype, device=x.device)
        scale[: H * D] = 1.0 / math.sqrt(D)
        qkv = F.linear(x, self.c_attn.weight * scale[:, None], self.c_attn.bias * scale)
        # one Reshape, Transpose and Split for all three (not one of each per tensor)
        qkv = qkv.view(B, S, 3 * H, D).transpose(1, 2)  # (B, 3H, S, D)
        return qkv.split(H, dim=1)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        B, _, S, _ = y.shape
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)  # (B, S, C)
        return self.resid_dropout(self.c_proj(y))

    def _out_flat(self, y: torch.Tensor) -> torch.Tensor:
        """``_out`` to (B*S, C) tokens: one ``Gemm`` with its bias."""
        B, _, S, _ = y.shape
        y = y.transpose(1, 2).reshape(B * S, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past: KV | None) -> tuple:
        """Attend over past + new keys; ``allowed`` is (B, 1, S, past+S). Returns (y, present)."""
        q, k, v = self._qkv(x)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, past+S, D)
            v = torch.cat([past[1], v], dim=2)
        att = self.attn_dropout(_masked_softmax(q @ k.transpose(-2, -1), allowed))
        return self._out(att @ v), (k, v)

    def forward_paged(
        self,
        x: torch.Tensor,
        pool: KV,
        table: torch.Tensor,
        rows: torch.Tensor,
        slots: torch.Tensor,
        weights: torch.Tensor,
        allowed: torch.Tensor,
    ) -> tuple:
        """Attend over a row's blocks of a read-only pool and its new keys; no cache is copied.

        ``x`` is the batch's B*S tokens as rows, (B*S, C), and so is the result (projections
        as ``Gemm``). ``pool`` holds (P, H, bs, D) key and value blocks; ``table`` (B, nb)
        lists row b's blocks in token order; ``rows`` (P,) is the row whose queries score
        each pool block, ``slots`` (P,) its place in the rows' tables (``row * nb + place``)
        and ``weights`` (B, P) 1 where a block holds row b's cache; ``allowed`` is
        (B, 1, S, nb * bs + S).
        Scores are computed block by block against the owner's queries, so each block is read
        where it lies (a gather of the pool would copy the whole cache every step); only the
        small score and probability tensors are laid out per row, for one softmax over cache
        and new tokens. Returns (y, (k, v)) with only the new tokens' keys/values, (B, H, S, D).
        """
        # q comes scaled (the scale is in the projection's weights), so the scores' matmuls
        # keep alpha 1: onnxruntime folds a scale applied to a product into the matmul as
        # alpha, and MLAS's one-row kernel (what a decode step's attention runs) takes alpha 1
        # only; the general kernel made these small matmuls ~1/3 slower (249 vs 181 us a call).
        q, k, v = self._qkv_flat(x, allowed.shape[0], allowed.shape[2])  # (B, H, S, D)
        pool_k, pool_v = pool
        B, H, S, D = q.shape
        P, bs = pool_k.shape[0], pool_k.shape[2]
        nb = table.shape[1]
        W = nb * bs
        # index_select (ONNX Gather) rather than advanced indexing (GatherND): one contiguous
        # copy per index, the cheaper kernel.
        scores_b = q.index_select(0, rows) @ pool_k.transpose(-2, -1)  # (P, H, S, bs)
        scores_c = scores_b.index_select(0, table.reshape(-1)).reshape(B, nb, H, S, bs)
        scores_c = scores_c.permute(0, 2, 3, 1, 4).reshape(B, H, S, W)
        scores = torch.cat([scores_c, q @ k.transpose(-2, -1)], dim=-1)
        p = _masked_softmax(scores, allowed)  # (B, H, S, nb*bs + S)
        p_rows = p[..., :W].reshape(B, H, S, nb, bs).permute(0, 3, 1, 2, 4)  # (B, nb, H, S, bs)
        p_b = p_rows.reshape(B * nb, H, S, bs).index_select(0, slots)  # (P, H, S, bs)
        out_b = (p_b @ pool_v).reshape(P, H * S * D)  # (P, H*S*D)
        y = (weights @ out_b).reshape(B, H, S, D) + p[..., W:] @ v  # sum each row's blocks
        return self._out_flat(y), (k, v)

    def forward_static(
        self,
        x: torch.Tensor,
        cache: KV,
        rows: torch.Tensor,
        cache_pos: torch.Tensor,
        allowed: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        """Write the new keys/values into ``cache`` (B, H, T, D) at ``cache_pos``, then attend.

        ``rows`` is (B, 1) ``arange``, ``cache_pos`` (B, S), ``allowed`` (B, 1, S, window).
        """
        q, k, v = self._qkv(x)  # (B, H, S, D)
        cache_k, cache_v = cache
        # Indices on axes 0 and 2 around a slice: the indexed view is (B, S, H, D).
        cache_k[rows, :, cache_pos] = k.transpose(1, 2)
        cache_v[rows, :, cache_pos] = v.transpose(1, 2)
        keys, values = cache_k[:, :, :window], cache_v[:, :, :window]  # views, never copies
        att = _masked_softmax(q @ keys.transpose(-2, -1), allowed)  # (B, H, S, window)
        return self._out(att @ values)


class MLP(nn.Module):
    """GPT-2's position-wise feed-forward: 4x expansion, tanh-approximated GELU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, past: KV | None) -> tuple:
        y, present = self.attn(self.ln_1(x), allowed, past)
        x = x + y
        return x + self.mlp(self.ln_2(x)), present

    def forward_paged(self, x, pool: KV, table, rows, slots, weights, allowed):
        y, new = self.attn.forward_paged(self.ln_1(x), pool, table, rows, slots, weights, allowed)
        x = x + y
        return x + self.mlp(self.ln_2(x)), new

    def forward_static(self, x, cache: KV, rows, cache_pos, allowed, window: int) -> torch.Tensor:
        x = x + self.attn.forward_static(self.ln_1(x), cache, rows, cache_pos, allowed, window)
        return x + self.mlp(self.ln_2(x))


def _causal(S: int, L: int, device: torch.device) -> torch.Tensor:
    """(S, L) bool: query i (the (L-S+i)-th token overall) may see keys 0..L-S+i."""
    q_idx = torch.arange(S, device=device) + (L - S)
    k_idx = torch.arange(L, device=device)
    return k_idx[None, :] <= q_idx[:, None]


class GPT(nn.Module):
    """The decoder LM: token + position embeddings, ``n_layer`` blocks, tied output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Count parameters once each (the tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, S, C)
        return self.transformer.drop(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))  # (B, S, V)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_kv: list[KV] | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Return logits (B, S, V) and the present keys/values, each (B, H, past+S, D).

        ``attention_mask`` (B, past+S) has 1 for tokens to attend to and 0 for padding; rows
        may be left-padded to different lengths, with ``position_ids`` (B, S) counting only
        each row's real tokens. ``past_kv`` may be None or hold zero-length tensors.
        """
        B, S = input_ids.shape
        past = past_kv[0][0].shape[2] if past_kv else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        L = attention_mask.shape[1] if attention_mask is not None else past + S
        allowed = _causal(S, L, input_ids.device)[None, None]  # (1, 1, S, L)
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] != 0)  # (B, 1, S, L)
        x = self._embed(input_ids, position_ids)
        present = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, allowed, past_kv[i] if past_kv else None)
            present.append(kv)
        return self._head(x), present

    def forward_paged(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        causal_mask: torch.Tensor,
        block_table: torch.Tensor,
        block_mask: torch.Tensor,
        block_rows: torch.Tensor,
        block_slots: torch.Tensor,
        block_weights: torch.Tensor,
        cache: list[KV],
    ) -> tuple[torch.Tensor, list[KV]]:
        """Return logits (B, S, V) and only the new keys/values (B, H, S, D) per layer.

        ``cache`` holds per-layer (key, value) pools of blocks (P, H, bs, D) that are read,
        never copied. ``block_table`` (B, nb) names row b's blocks in token order and
        ``block_mask`` (B, nb, bs) which of their tokens row b attends to; ``causal_mask``
        (B, S, S) which new tokens each new token attends to (causal, padding excluded). Per
        pool block: ``block_rows`` (P,) the row whose queries score it, ``block_slots`` (P,)
        ``row * nb + place`` in that row's table, ``block_weights`` (B, P) 1 where it holds
        row b's cache (0 for blocks no row reads). The runtime computes these from its block
        tables (engine/paged_inputs.py); in the graph they cost dozens of small nodes a step.
        Every cached token precedes the new ones (positions come from ``position_ids``).
        """
        B, nb, bs = block_mask.shape
        S = input_ids.shape[1]
        cache_allowed = block_mask.reshape(B, 1, 1, nb * bs).expand(-1, -1, S, -1)
        allowed = torch.cat([cache_allowed, causal_mask[:, None]], dim=-1)  # (B, 1, S, W + S)
        # (B*S, C) tokens through the blocks: each projection is one Gemm with its bias
        x = self._embed(input_ids, position_ids).reshape(B * S, -1)
        new = []
        for block, kv in zip(self.transformer.h, cache):
            x, kv_new = block.forward_paged(
                x, kv, block_table, block_rows, block_slots, block_weights, allowed
            )
            new.append(kv_new)
        return self._head(x.reshape(B, S, -1)), new

    def forward_static(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: list[KV],
        cache_pos: torch.Tensor,
        window: int,
    ) -> torch.Tensor:
        """Return logits (B, S, V); write the new keys/values into ``cache`` in place.

        ``cache`` holds per-layer (key, value) buffers (B, H, T, D) whose row b belongs to batch
        row b (views of the runtime's pool). Token s of row b is stored at ``cache_pos[b, s]``
        and attends to the cache positions ``t <= cache_pos[b, s]`` among the first ``window``
        (``window`` must cover every row's last position; stale slots past it stay unread).
        A row whose ``cache_pos`` points past ``window`` - a padding row of a CUDA-graph batch,
        written to a scratch position - attends to the whole window and its output is ignored.
        """
        B = input_ids.shape[0]
        rows = torch.arange(B, device=input_ids.device)[:, None]  # (B, 1)
        keys = torch.arange(window, device=input_ids.device)
        allowed = (keys[None, None, :] <= cache_pos[:, :, None])[:, None]  # (B, 1, S, window)
        x = self._embed(input_ids, position_ids)
        for block, kv in zip(self.transformer.h, cache):
            x = block.forward_static(x, kv, rows, cache_pos, allowed, window)
        return self._head(x)


# HF's ``Conv1D`` stores these weights as (in, out), the transpose of ``nn.Linear``.
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Buffers older GPT-2 checkpoints save (the causal mask); this model builds its mask per call.
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def to_gpt2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map this model's state dict onto Hugging Face ``GPT2LMHeadModel`` parameter names.

    Names are already GPT-2's; the four projection weights are transposed (``Conv1D``). A state
    dict that kept only one of the tied ``lm_head.weight`` / ``transformer.wte.weight`` (a saved
    checkpoint keeps one) gets the other back.
    """
    out = {}
    for name, t in state_dict.items():
        out[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    # not setdefault: it evaluates its default first, a KeyError when only one name was saved
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    if "transformer.wte.weight" not in out:
        out["transformer.wte.weight"] = out["lm_head.weight"]
    return out


def from_gpt2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict onto this model's.

    The inverse of :func:`to_gpt2_state_dict`: projection weights transposed back, the causal
    mask buffers dropped, a bare ``GPT2Model``'s names given the ``transformer.`` prefix, and the
    tied head taken from the token embedding.
    """
    out = {}
    for name, t in state_dict.items():
        if name.endswith(GPT2_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"
        out[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    if "transformer.wte.weight" in out:  # tied: the embedding is the head (as GPT-2 ties them)
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
