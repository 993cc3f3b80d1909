"""A tiny test-only architecture registered through ENGINE_PLUGINS: linear regression on noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import hookimpl
from engine.architecture import Architecture, DataBundle, ExportSignature, QualityResult, TensorSpec


@dataclass
class ToyConfig:
    """Linear regression y = x @ w + noise; small enough to train in milliseconds."""

    features: int = 4
    steps: int = 60
    lr: float = 0.1
    batch_size: int = 32


class ToyRegression(Architecture):
    """Least squares by SGD: loss must fall well below the variance of y."""

    name = "toy-regression"
    task = "classify"
    description = "test-only linear regression"
    config_class = ToyConfig

    def build_model(self, config):
        import torch

        return torch.nn.Linear(config.features, 1)

    def load_data(self, config, cache_dir: Path, artifacts_dir):
        rng = np.random.default_rng(0)
        w = rng.normal(size=(config.features, 1)).astype(np.float32)
        x = rng.normal(size=(512, config.features)).astype(np.float32)
        y = x @ w + 0.01 * rng.normal(size=(512, 1)).astype(np.float32)
        return DataBundle(train=(x[:400], y[:400]), eval=(x[400:], y[400:]), info={"n": 512})

    def configure_optimizers(self, model, config):
        import torch

        return [torch.optim.SGD(model.parameters(), lr=config.lr)]

    def train_batches(self, data, config, seed, rank, world_size):
        import torch

        x, y = data.train
        rng = np.random.default_rng([seed, rank])
        while True:
            idx = rng.integers(0, len(x), config.batch_size)
            yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])

    def training_step(self, model, batch, optimizers, ctx):
        import torch

        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        ctx.step(loss, optimizers[0])
        return {"loss": float(loss.detach()), "items": len(x)}

    def evaluate(self, model, data, config):
        import torch

        x, y = data.eval
        mse = float(torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y)))
        return {"mse": mse, "variance": float(y.var())}

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        ok = metrics["mse"] < 0.1 * metrics["variance"]
        return QualityResult(ok, f"mse {metrics['mse']:.4f} vs variance {metrics['variance']:.3f}")

    def sample(self, model, ckpt_dir, config, options):
        return f"weights {model.weight.detach().numpy().round(2).tolist()}"

    def export_signature(self, config, variant="default"):
        return ExportSignature(
            inputs=(TensorSpec("x", "float32", ("batch", config.features)),),
            outputs=(TensorSpec("y", "float32", ("batch", 1)),),
        )

    def export_module(self, model, config, variant="default"):
        return model

    def example_inputs(self, config, batch, seq, past, seed=0, variant="default"):
        rng = np.random.default_rng(seed)
        return {"x": rng.normal(size=(batch, config.features)).astype(np.float32)}

    def serving_metadata(self, config, ckpt_dir):
        return {"labels": ["y"], "input": "x"}  # a tensor classifier (the serving contract)


@hookimpl
def engine_register_architectures():
    """Register the toy architecture."""
    return [ToyRegression()]
