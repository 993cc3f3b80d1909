"""The ``decoder-lm`` architecture: a small GPT trained on the Python stdlib's own source."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from engine.architecture import (
    Architecture,
    DataBundle,
    ExportSignature,
    QualityResult,
    StepContext,
    TensorSpec,
)
from engine.atomic import write_bytes
from engine.graph_decoder import GraphDecoder, torch_runner
from engine.paged_inputs import PAGED_INPUTS, paged_inputs
from plugins.decoder_lm import data as lm_data
from plugins.decoder_lm.model import GPT, GPTConfig
from plugins.stdlib_text import EOT, PAD

EOT_ID, PAD_ID = 0, 1  # stdlib_text's fixed special-token order
QUALITY_BAR_NATS = 2.0  # held-out CE must beat the unigram model by this much (the bar)
# Held-out positions a quantized export is scored on: 8k teacher-forced tokens give top-1
# agreement to +-0.15% (one standard error at 98%), in seconds even at GPT-2-small size.
HELDOUT_WINDOWS, HELDOUT_WINDOW = 64, 128


@dataclass
class DecoderLMConfig(GPTConfig):
    """Model shape (inherited) plus the default training run: ~10 minutes on 2 CPU cores."""

    batch_size: int = 16  # global batch of windows (split across ranks); 2k tokens per step
    steps: int = 700  # 1.4M tokens (half an epoch): ~2.4 nats over unigram, ~8 min on 2 cores
    lr: float = 2e-3  # peak lr; small models with warmup tolerate a high one
    min_lr: float = 2e-4  # cosine decays to lr/10, as in nanoGPT
    warmup_steps: int = 100  # let Adam's second moments settle before the peak lr
    weight_decay: float = 0.1  # on 2-D weights only; biases and LayerNorm gains are not decayed
    grad_clip: float = 1.0  # global-norm clip (applied by the trainer) guards the high peak lr
    beta2: float = 0.99  # nanoGPT's choice when a step sees few tokens
    heldout_fraction: float = 0.1  # of stdlib files (by path hash), never trained on
    eval_windows: int = 256  # fixed held-out windows: 32k scored tokens, a stable estimate


class DecoderLM(Architecture):
    """GPT-style decoder LM with a KV cache, served by the runtime's ``generate`` task."""

    name = "decoder-lm"
    task = "generate"
    description = "GPT-2-shaped decoder LM (~5M params) on the Python stdlib's source, BPE 8192"
    config_class = DecoderLMConfig
    item_unit = "tokens"

    # -- training ---------------------------------------------------------------------------
    def build_model(self, config: DecoderLMConfig) -> GPT:
        """Build the GPT for ``config`` (the trainer seeds torch first)."""
        return GPT(config)

    def load_data(
        self, config: DecoderLMConfig, cache_dir: Path, artifacts_dir: Path | None
    ) -> DataBundle:
        """Tokenize the stdlib (cached) into train/held-out streams; reuse a saved tokenizer."""
        train, heldout, tokenizer, info = lm_data.load_streams(
            config.vocab_size, config.heldout_fraction, artifacts_dir
        )
        return DataBundle(train, heldout, artifacts={"tokenizer": tokenizer}, info=info)

    def configure_optimizers(self, model: nn.Module, config: DecoderLMConfig) -> list[Any]:
        """AdamW with weight decay on 2-D weights only (the lr is set by ``training_step``)."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return [torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))]

    def train_batches(
        self, data: DataBundle, config: DecoderLMConfig, seed: int, rank: int, world_size: int
    ) -> Iterator[torch.Tensor]:
        """Yield (batch, block_size+1) random windows of the train stream; one seed per rank."""
        rng = np.random.default_rng([seed, rank])
        per_rank = max(1, config.batch_size // max(1, world_size))
        for windows in lm_data.random_windows(data.train, config.block_size + 1, per_rank, rng):
            yield torch.from_numpy(windows)

    def training_step(
        self, model: nn.Module, batch: torch.Tensor, optimizers: list[Any], ctx: StepContext
    ) -> dict[str, float]:
        """One next-token cross-entropy update at the scheduled learning rate."""
        (opt,) = optimizers
        # The schedule reads the config the model was built from, so --steps and resume agree.
        lr = _scheduled_lr(model.config, ctx.step_index)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batch.to(ctx.device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        ctx.step(loss, opt)
        return {"loss": loss.item(), "items": float(y.numel()), "lr": lr}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: DataBundle, config: DecoderLMConfig) -> dict:
        """Held-out CE (nats/token) on fixed windows, against an add-one unigram baseline."""
        windows = lm_data.fixed_windows(data.eval, config.block_size + 1, config.eval_windows)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for chunk in torch.from_numpy(windows).split(32):
            chunk = chunk.to(device)
            logits, _ = model(chunk[:, :-1])
            targets = chunk[:, 1:].reshape(-1)
            flat = logits.reshape(-1, logits.size(-1)).float()
            total += F.cross_entropy(flat, targets, reduction="sum").item()
            count += targets.numel()
        model.train(was_training)
        heldout = total / count
        unigram = lm_data.unigram_ce(data.train, windows[:, 1:], config.vocab_size)
        return {
            "heldout_ce": heldout,
            "unigram_ce": unigram,
            "gain_nats": unigram - heldout,
            "perplexity": math.exp(heldout),
            "n_params": sum(p.numel() for p in model.parameters()),
            "eval_tokens": count,
        }

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """Pass when held-out CE is at least 2 nats/token below the unigram baseline."""
        gain = metrics["gain_nats"]
        passed = gain >= QUALITY_BAR_NATS
        summary = (
            f"held-out CE {metrics['heldout_ce']:.3f} nats/token vs unigram "
            f"{metrics['unigram_ce']:.3f}: {gain:.3f} nats better "
            f"({'meets' if passed else 'misses'} the {QUALITY_BAR_NATS} bar)"
        )
        return QualityResult(passed, summary)

    def save_artifacts(self, data: DataBundle, out_dir: Path) -> None:
        """Write the tokenizer beside the weights."""
        tokenizer = data.artifacts["tokenizer"]
        write_bytes(Path(out_dir) / lm_data.TOKENIZER_FILE, tokenizer.to_str().encode())

    def artifact_files(self, ckpt_dir: Path) -> list[Path]:
        """The tokenizer travels with the exported graph."""
        return [Path(ckpt_dir) / lm_data.TOKENIZER_FILE]

    def heldout_examples(
        self, config: DecoderLMConfig, ckpt_dir: Path
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Fixed held-out windows (64 x up to 128 tokens) and their next tokens."""
        tokenizer = lm_data.load_tokenizer(Path(ckpt_dir) / lm_data.TOKENIZER_FILE)
        stream = lm_data.heldout_stream(tokenizer, config.heldout_fraction)
        width = min(config.block_size, HELDOUT_WINDOW)
        windows = lm_data.fixed_windows(stream, width + 1, HELDOUT_WINDOWS)  # (N, T+1)
        ids = windows[:, :-1]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}, windows[:, 1:]

    # -- inspection ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self, model: nn.Module, ckpt_dir: Path, config: DecoderLMConfig, options: dict
    ) -> str:
        """Continue ``prompt`` (default ``"def "``) using the KV cache; return the whole text.

        Options: max_tokens (64), temperature (0.8; 0 is greedy), top_k (0 = off),
        top_p (1.0 = off), seed (0). One trailing space is left for the model to generate:
        byte-level BPE glues a space to the word after it, so ``"def "`` would otherwise end in
        a lone-space token that code rarely contains.
        """
        tokenizer = lm_data.load_tokenizer(Path(ckpt_dir) / lm_data.TOKENIZER_FILE)
        eos = tokenizer.token_to_id(EOT)
        prompt = str(options.get("prompt", "def "))
        if prompt.endswith(" ") and prompt.strip():
            prompt = prompt[:-1]
        ids = tokenizer.encode(prompt).ids[-(config.block_size - 1) :] or [eos]
        gen = torch.Generator().manual_seed(int(options.get("seed", 0)))
        temperature = float(options.get("temperature", 0.8))
        top_k, top_p = int(options.get("top_k", 0)), float(options.get("top_p", 1.0))

        def pick(logits: np.ndarray, step: int) -> np.ndarray:  # logits (1, V)
            row = torch.from_numpy(logits[0]).float()
            return np.array([_pick(row, temperature, top_k, top_p, gen)])

        # the engine's decode loop over the export wrapper: the path export validation checks
        signature = self.export_signature(config)
        run = torch_runner(self.export_module(model.eval(), config), signature)
        max_new = min(int(options.get("max_tokens", 64)), config.block_size - len(ids))
        out = GraphDecoder(signature).generate(run, [ids], max_new, PAD_ID, pick, stop_id=eos)
        out = out[0].tolist()
        return prompt + tokenizer.decode(out[: out.index(eos)] if eos in out else out)

    # -- export and serving ------------------------------------------------------------------
    def export_variants(self, config: DecoderLMConfig) -> tuple[str, ...]:
        """The concatenating graph first; ``kv_inplace`` reads a preallocated cache instead."""
        return ("default", "kv_inplace")

    def export_signature(
        self, config: DecoderLMConfig, variant: str = "default"
    ) -> ExportSignature:
        """Names and axes of either graph; KV tensors are (batch, n_head, axis, head_dim)."""
        H, D, V = config.n_head, config.head_dim, config.vocab_size
        tokens = ("batch", "sequence")
        logits = TensorSpec("logits", "float32", ("batch", "sequence", V))
        layers = range(config.n_layer)
        if variant == "default":
            inputs = [
                TensorSpec("input_ids", "int64", tokens),
                TensorSpec("position_ids", "int64", tokens),
                TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
            ]
            inputs += _kv_specs("past_key_values", layers, ("batch", H, "past_sequence", D))
            outputs = [logits, *_kv_specs("present", layers, ("batch", H, "total_sequence", D))]
        elif variant == "kv_inplace":
            # The runtime's paged KV cache: pools of blocks read in place through block tables.
            inputs = [
                TensorSpec("input_ids", "int64", tokens),
                TensorSpec("position_ids", "int64", tokens),
                TensorSpec("causal_mask", "bool", ("batch", "sequence", "sequence")),
                TensorSpec("block_table", "int64", ("batch", "table_blocks")),
                TensorSpec("block_mask", "bool", ("batch", "table_blocks", config.kv_block_size)),
                TensorSpec("block_rows", "int64", ("pool_blocks",)),
                TensorSpec("block_slots", "int64", ("pool_blocks",)),
                TensorSpec("block_weights", "float32", ("batch", "pool_blocks")),
            ]
            pool = ("pool_blocks", H, config.kv_block_size, D)
            inputs += _kv_specs("cache", layers, pool)
            outputs = [logits, *_kv_specs("new", layers, ("batch", H, "sequence", D))]
        else:
            raise ValueError(f"unknown export variant {variant!r} for {self.name}")
        # Trained default: logits up to ~12, onnxruntime CPU within 1e-5 of torch (measured);
        # 2e-4 leaves room for other kernels' summation order.
        return ExportSignature(tuple(inputs), tuple(outputs), atol=2e-4, rtol=1e-3)

    def export_module(
        self, model: nn.Module, config: DecoderLMConfig, variant: str = "default"
    ) -> nn.Module:
        """Wrap the GPT so ``forward(*inputs)`` follows the signature's order."""
        fn = {"default": _default_graph, "kv_inplace": _inplace_graph}.get(variant)
        if fn is None:
            raise ValueError(f"unknown export variant {variant!r} for {self.name}")
        return _graph_module(model, fn, self.export_signature(config, variant).input_names())

    def example_inputs(
        self,
        config: DecoderLMConfig,
        batch: int,
        seq: int,
        past: int,
        seed: int = 0,
        variant: str = "default",
    ) -> dict[str, np.ndarray]:
        """Inputs of the runtime's shape: row 0 full, later rows left-padded / shorter caches.

        Positions count each row's valid tokens, as the runtime assigns them. For
        ``kv_inplace`` each row's ``past`` tokens (fewer for later rows) sit in shuffled blocks
        of a pool that also holds blocks no row owns, as the runtime's pool does.
        """
        if variant not in self.export_variants(config):
            raise ValueError(f"unknown export variant {variant!r} for {self.name}")
        rng = np.random.default_rng(seed)
        H, D = config.n_head, config.head_dim
        # Later rows get more left padding in the new chunk (row 0 none, at most half).
        new_pad = (np.arange(batch) * (seq // 2)) // max(batch - 1, 1)
        new_mask = (np.arange(seq)[None, :] >= new_pad[:, None]).astype(np.int64)
        if variant == "kv_inplace":
            return _paged_example(config, rng, batch, past, new_mask)
        # Cache slots: row 0 all valid, other rows lose about a quarter at random.
        cache_mask = (rng.random((batch, past)) >= 0.25).astype(np.int64)
        cache_mask[0] = 1
        ids = _new_tokens(config, rng, cache_mask.sum(axis=1), new_mask)
        kv = {}
        for i in range(config.n_layer):
            for part in ("key", "value"):
                kv[f"past_key_values.{i}.{part}"] = rng.standard_normal((batch, H, past, D)).astype(
                    np.float32
                )
        return {**ids, "attention_mask": np.concatenate([cache_mask, new_mask], 1), **kv}

    def serving_metadata(self, config: DecoderLMConfig, ckpt_dir: Path) -> dict[str, Any]:
        """Shape of the KV cache, context length, special token ids and the tokenizer file."""
        eos_id, pad_id = EOT_ID, PAD_ID
        path = Path(ckpt_dir) / lm_data.TOKENIZER_FILE
        if path.exists():
            tokenizer = lm_data.load_tokenizer(path)
            eos_id, pad_id = tokenizer.token_to_id(EOT), tokenizer.token_to_id(PAD)
            if pad_id is None:  # GPT-2's tokenizer has no pad token: pad with end-of-text
                pad_id = eos_id
        return {
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "context_length": config.block_size,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "tokenizer": lm_data.TOKENIZER_FILE,
            "kv_block_size": config.kv_block_size,
        }


def _new_tokens(config, rng, cached: np.ndarray, new_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Random ids of the new tokens (padding where masked) and positions after ``cached``."""
    batch, seq = new_mask.shape
    position_ids = np.where(new_mask == 1, cached[:, None] + np.cumsum(new_mask, axis=1) - 1, 0)
    position_ids = np.minimum(position_ids, config.block_size - 1).astype(np.int64)
    input_ids = rng.integers(4, config.vocab_size, size=(batch, seq)).astype(np.int64)
    return {"input_ids": np.where(new_mask == 1, input_ids, PAD_ID), "position_ids": position_ids}


def _paged_example(config, rng, batch: int, past: int, new_mask: np.ndarray) -> dict:
    """kv_inplace inputs: rows' cached tokens in shuffled pool blocks among unowned ones."""
    H, D, bs = config.n_head, config.head_dim, config.kv_block_size
    # Row 0 caches all ``past`` tokens, later rows fewer. At least two table and pool columns,
    # so tracing keeps those axes symbolic.
    cache_lens = np.array([past] + rng.integers(0, past + 1, batch - 1).tolist(), np.int64)
    nb = max(2, -(-past // bs))
    pool_blocks = batch * nb + 3  # 3 blocks nobody in the batch owns
    order = rng.permutation(pool_blocks)
    table = order[: batch * nb].reshape(batch, nb).astype(np.int64)
    owner = np.full(pool_blocks, -1, np.int64)
    index = np.zeros(pool_blocks, np.int64)
    owner[table] = np.arange(batch)[:, None]
    index[table] = np.arange(nb)[None, :]
    feeds = {
        **_new_tokens(config, rng, cache_lens, new_mask),
        **paged_inputs(new_mask, cache_lens, table, owner, index, bs),
    }
    for i in range(config.n_layer):
        for part in ("key", "value"):
            shape = (pool_blocks, H, bs, D)
            feeds[f"cache.{i}.{part}"] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _scheduled_lr(config: DecoderLMConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    peak, low, warmup, total = config.lr, config.min_lr, config.warmup_steps, config.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - low)


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> int:
    """Sample one token id from (V,) logits with temperature, top-k and nucleus filtering."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first over
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def _kv_specs(prefix: str, layers: range, shape: tuple) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.{i}.{part}", "float32", shape)
        for i in layers
        for part in ("key", "value")
    ]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _default_graph(model: GPT, input_ids, position_ids, attention_mask, *past_flat) -> tuple:
    logits, present = model(input_ids, position_ids, attention_mask, _pairs(past_flat))
    return (logits, *(t for kv in present for t in kv))


def _inplace_graph(model: GPT, input_ids, position_ids, *rest) -> tuple:
    n = len(PAGED_INPUTS)  # the per-step inputs, in the signature's order, then the pools
    logits, new = model.forward_paged(input_ids, position_ids, *rest[:n], _pairs(rest[n:]))
    return (logits, *(t for kv in new for t in kv))


def _graph_module(model: GPT, fn, input_names: list[str]) -> nn.Module:
    """Wrap ``fn(model, *tensors)`` in a module whose ``forward`` names every graph input.

    The per-layer KV inputs vary with ``n_layer``; an explicit signature (not ``*args``) lets
    torch.export and the dynamo ONNX exporter bind dynamic shapes to each input by position.
    """

    def forward(self, *tensors):
        return fn(self.model, *tensors)

    P = inspect.Parameter
    params = [P(n.replace(".", "_"), P.POSITIONAL_OR_KEYWORD) for n in ["self", *input_names]]
    forward.__signature__ = inspect.Signature(params)
    graph = type("DecoderLMGraph", (nn.Module,), {"forward": forward})()
    graph.model = model
    return graph
