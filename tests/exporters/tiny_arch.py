"""A test-only ``classify`` architecture for export tests, registered through ENGINE_PLUGINS.

Bag-of-embeddings classifier over random token ids: tiny, trains in a second, and its config
can declare a deliberately wrong signature or tolerance to exercise validation failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import hookimpl
from engine.architecture import Architecture, DataBundle, ExportSignature, QualityResult, TensorSpec

NAME = "tiny-export-classifier"


@dataclass
class TinyConfig:
    """Sizes plus knobs that make the declared signature wrong on purpose."""

    vocab: int = 50
    dim: int = 16
    classes: int = 5
    steps: int = 20
    declared_classes: int = 0  # 0: declare the true width; else a wrong one (ShapeMismatch)
    fp16_atol: float = 5e-2  # set to ~0 for a deliberately wrong fp16 tolerance
    fp16_rtol: float = 5e-2


def _module(config: TinyConfig):
    import torch

    class BagClassifier(torch.nn.Module):
        """Mean of token embeddings under the mask, then a linear head: (B, T) -> (B, C)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(config.vocab, config.dim)
            self.norm = torch.nn.LayerNorm(config.dim)
            self.head = torch.nn.Linear(config.dim, config.classes)

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)  # (B, T, 1)
            pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.head(self.norm(pooled))  # (B, C)

    return BagClassifier()


class TinyClassifier(Architecture):
    """Classify random token bags by the rule ``label = first token % classes``."""

    name = NAME
    task = "classify"
    description = "test-only bag-of-embeddings classifier"
    config_class = TinyConfig

    def build_model(self, config: TinyConfig):
        return _module(config)

    def load_data(self, config, cache_dir: Path, artifacts_dir):
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config.vocab, (256, 8)).astype(np.int64)
        return DataBundle(train=ids, eval=ids[:64], info={"rows": 256})

    def configure_optimizers(self, model, config):
        import torch

        return [torch.optim.Adam(model.parameters(), lr=0.05)]

    def train_batches(self, data, config, seed, rank, world_size):
        import torch

        rng = np.random.default_rng([seed, rank])
        while True:
            ids = data.train[rng.integers(0, len(data.train), 32)]
            yield torch.from_numpy(ids), torch.from_numpy(ids[:, 0] % config.classes)

    def training_step(self, model, batch, optimizers, ctx):
        import torch

        ids, labels = batch
        loss = torch.nn.functional.cross_entropy(model(ids, torch.ones_like(ids)), labels)
        ctx.step(loss, optimizers[0])
        return {"loss": float(loss.detach()), "items": len(ids)}

    def evaluate(self, model, data, config):
        return {"rows": len(data.eval)}

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        return QualityResult(True, "test-only architecture")

    def sample(self, model, ckpt_dir, config, options):
        return "tiny"

    def export_signature(self, config: TinyConfig, variant: str = "default") -> ExportSignature:
        width = config.declared_classes or config.classes
        return ExportSignature(
            inputs=(
                TensorSpec("input_ids", "int64", ("batch", "sequence")),
                TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            ),
            outputs=(TensorSpec("logits", "float32", ("batch", width)),),
            fp16_atol=config.fp16_atol,
            fp16_rtol=config.fp16_rtol,
        )

    def export_module(self, model, config, variant: str = "default"):
        return model

    def example_inputs(self, config, batch, seq, past, seed=0, variant="default"):
        rng = np.random.default_rng(seed)
        seq = max(seq, 2)
        lengths = rng.integers(1, seq + 1, batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(0, config.vocab, (batch, seq)).astype(np.int64) * mask
        return {"input_ids": ids, "attention_mask": mask}

    def save_artifacts(self, data, out_dir: Path) -> None:
        """A word-level tokenizer over the ids' spellings ("7" -> 7): the serving contract's."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {str(i): i for i in range(TinyConfig.vocab)}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="0"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(Path(out_dir) / "tokenizer.json"))

    def artifact_files(self, ckpt_dir: Path) -> list[Path]:
        return [Path(ckpt_dir) / "tokenizer.json"]

    def serving_metadata(self, config, ckpt_dir):
        labels = [f"class{i}" for i in range(config.classes)]
        return {
            "labels": labels,
            "max_length": 32,
            "pad_token_id": 0,
            "tokenizer": "tokenizer.json",
        }


@hookimpl
def engine_register_architectures():
    """Register the tiny export-test classifier."""
    return [TinyClassifier()]
