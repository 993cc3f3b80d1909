"""A small pre-LN transformer encoder: a classification head (mean or [CLS]) and an MLM head.

Attention is written out as matmul + softmax with an additive key-padding bias, so the ONNX
graph is a handful of plain ops and padded positions never change the [CLS] output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Finite so fp16 exports hold no inf (and a row can never become NaN); exp(-1e4) is exactly 0
# in fp32 and fp16, so padded keys get zero weight.
MASK_BIAS = -1.0e4


class SelfAttention(nn.Module):
    """Multi-head self-attention over all (non-padded) positions: an encoder has no causal mask."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be a multiple of n_head"
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attend; ``bias`` (B, 1, 1, T) is 0 for real keys and MASK_BIAS for padding."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))) + bias  # (B, H, T, T)
        att = self.dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.proj(y))


class Block(nn.Module):
    """Pre-LN transformer block: LayerNorm before attention and MLP, residual around each."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
        return x + self.mlp(self.ln2(x))


class TextClassifier(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LN; heads read the outputs.

    ``forward`` classifies from the [CLS] position (index 0). ``mlm_logits`` predicts tokens
    for pretraining through its own decoder: tied to the token embedding, Adam would move every
    embedding row by about the learning rate each step (the softmax touches all of them) and a
    short pretraining run leaves the embeddings worse than random for fine-tuning.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int,
        n_layer: int,
        n_head: int,
        d_model: int,
        dropout: float,
        pooling: str = "cls",
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")
        self.pooling = pooling
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, num_classes))
        self.mlm_transform = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model)
        )
        self.mlm_decoder = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return final hidden states (B, T, C); ``attention_mask`` is 1 for tokens, 0 for pads."""
        T = input_ids.size(1)
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * MASK_BIAS  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, bias)
        return self.ln_f(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return class logits (B, num_classes) from the [CLS] position or the tokens' mean."""
        hidden = self.encode(input_ids, attention_mask)  # (B, T, C)
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map hidden states (N, C) of masked positions to vocabulary logits (N, vocab)."""
        return self.mlm_decoder(self.mlm_transform(hidden))


class ExportWrapper(nn.Module):
    """The exported graph: ``(input_ids, attention_mask) -> logits`` in float32."""

    def __init__(self, model: TextClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask).float()
