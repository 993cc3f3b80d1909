"""A BERT-family sequence classifier that reproduces Hugging Face's numerics.

Post-LayerNorm blocks (``LN(x + attention(x))``, ``LN(x + ffn(x))``), learned absolute
positions, optional segment (token type) embeddings, erf GELU, and a head that reads the first
([CLS]) position through a dense layer and an activation: tanh for BERT's pooler, ReLU for
DistilBERT's ``pre_classifier``. Parameter names are those of ``BertForSequenceClassification``
(``bert.encoder.layer.{i}.attention.self.query``...), so BERT weights load as they are and
DistilBERT's are renamed (``plugins.bert_classifier.hf``). Attention is an explicit matmul and
softmax with an additive padding bias, so the ONNX graph is plain ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Finite so fp16 graphs hold no inf; exp(-1e4) is exactly 0 in fp32 and fp16, as exp of
# transformers' dtype-minimum mask is, so padded keys get the same zero weight.
MASK_BIAS = -1.0e4
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class EncoderShape:
    """The network's shape (the architecture's config carries these fields and more)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no segment embeddings (DistilBERT)
    layer_norm_eps: float
    pooler_activation: str  # "tanh" (BERT) or "relu" (DistilBERT)
    num_labels: int
    pad_token_id: int
    dropout: float


class SelfAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections (BERT's names)."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        assert s.hidden_size % s.num_heads == 0, "hidden_size must be a multiple of num_heads"
        self.num_heads, self.head_dim = s.num_heads, s.hidden_size // s.num_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(s.hidden_size, s.hidden_size)
        self.value = nn.Linear(s.hidden_size, s.hidden_size)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` (B, 1, 1, T) is 0 for tokens and MASK_BIAS for padding; returns (B, T, C)."""
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, D)
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim)) + bias
        att = self.dropout(torch.softmax(scores, dim=-1))  # (B, H, T, T)
        return (att @ v).transpose(1, 2).reshape(B, T, C)


class Projection(nn.Module):
    """``dense`` then dropout, added to the residual and normalised (BERT's ``*Output``)."""

    def __init__(self, d_in: int, s: EncoderShape):
        super().__init__()
        self.dense = nn.Linear(d_in, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """``self`` attention and its ``output`` projection."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.self = SelfAttention(s)
        self.output = Projection(s.hidden_size, s)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    """The feed-forward expansion with erf GELU."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.intermediate_size)
        self.act = nn.GELU()  # transformers' "gelu" is the exact (erf) form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """One post-LayerNorm block."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.attention = Attention(s)
        self.intermediate = Intermediate(s)
        self.output = Projection(s.intermediate_size, s)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Embeddings(nn.Module):
    """Word + segment + position embeddings, normalised (in transformers' order of sums)."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.word_embeddings = nn.Embedding(s.vocab_size, s.hidden_size)
        self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.hidden_size)
        if s.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.hidden_size)
        self.LayerNorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # (B, T, C)
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    """``num_layers`` blocks."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.layer = nn.ModuleList(Layer(s) for _ in range(s.num_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, bias)
        return x


class Pooler(nn.Module):
    """The [CLS] position through ``dense`` and tanh (BERT) or ReLU (DistilBERT)."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.activation = ACTIVATIONS[s.pooler_activation]()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


class BertBody(nn.Module):
    """Embeddings, encoder and pooler (``BertModel``)."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.embeddings = Embeddings(s)
        self.encoder = Encoder(s)
        self.pooler = Pooler(s)


class BertClassifier(nn.Module):
    """``BertForSequenceClassification``'s network: logits (B, num_labels) from [CLS]."""

    def __init__(self, s: EncoderShape):
        super().__init__()
        self.bert = BertBody(s)
        self.dropout = nn.Dropout(s.dropout)
        self.classifier = nn.Linear(s.hidden_size, s.num_labels)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # BERT's initializer_range
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits; ``attention_mask`` is 1 for tokens, 0 for (right) padding."""
        x = self.bert.embeddings(input_ids, token_type_ids)  # (B, T, C)
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * MASK_BIAS  # (B, 1, 1, T)
        hidden = self.bert.encoder(x, bias)
        return self.classifier(self.dropout(self.bert.pooler(hidden)))


class ExportWrapper(nn.Module):
    """The exported graph: ``(input_ids, attention_mask[, token_type_ids]) -> logits``."""

    def __init__(self, model: BertClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *segments):
        return self.model(input_ids, attention_mask, *segments).float()
