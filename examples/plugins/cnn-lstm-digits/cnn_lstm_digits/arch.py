"""The ``cnn-lstm-digits`` architecture: every method of the engine's Architecture contract."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnn_lstm_digits.model import NUM_CLASSES, CnnLstm, CnnLstmConfig
from engine.architecture import (
    Architecture,
    DataBundle,
    ExportSignature,
    QualityResult,
    StepContext,
    TensorSpec,
)

MIN_ACCURACY = 0.95
LABELS = [str(d) for d in range(NUM_CLASSES)]
SHADES = " .:-=+*#%@"  # 10 shades for printing a digit in a terminal


@lru_cache(maxsize=4)
def digit_split(holdout: float, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Return ((train pixels, labels), (held-out pixels, labels)), stratified by digit.

    Pixels are (N, 1, 8, 8) float32 in [0, 1] (sklearn's grey levels 0..16 divided by 16).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = (bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = bunch.target.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        pixels, labels, test_size=holdout, stratify=labels, random_state=seed
    )
    return (x_tr, y_tr), (x_ev, y_ev)


class CnnLstmDigits(Architecture):
    """CNN row features read by an LSTM; classifies sklearn's 8x8 digits."""

    name = "cnn-lstm-digits"
    task = "classify"
    description = "example out-of-tree plugin: CNN row features + LSTM on sklearn's 8x8 digits"
    config_class = CnnLstmConfig
    item_unit = "images"

    # -- training -------------------------------------------------------------------------------
    def build_model(self, config: CnnLstmConfig) -> CnnLstm:
        """Build the classifier (the trainer has seeded torch)."""
        return CnnLstm(config)

    def load_data(
        self, config: CnnLstmConfig, cache_dir: Path, artifacts_dir: Path | None
    ) -> DataBundle:
        """Load the stratified split; the data ships with scikit-learn, so nothing is cached."""
        train, held_out = digit_split(config.holdout, config.split_seed)
        info = {"train_images": len(train[1]), "eval_images": len(held_out[1]), "labels": LABELS}
        return DataBundle(train=train, eval=held_out, info=info)

    def configure_optimizers(self, model: CnnLstm, config: CnnLstmConfig) -> list[Any]:
        """One AdamW over all parameters."""
        return [
            torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        ]

    def train_batches(
        self, data: DataBundle, config: CnnLstmConfig, seed: int, rank: int, world_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield random minibatches (pixels, labels) of this rank's shard forever."""
        pixels, labels = data.train
        shard = np.arange(rank, len(labels), world_size)
        rng = np.random.default_rng([seed, rank])
        while True:
            idx = rng.choice(shard, size=config.batch_size, replace=len(shard) < config.batch_size)
            yield torch.from_numpy(pixels[idx]), torch.from_numpy(labels[idx])

    def training_step(
        self, model: CnnLstm, batch: Any, optimizers: list[Any], ctx: StepContext
    ) -> dict[str, float]:
        """One cross-entropy update."""
        pixels, labels = (t.to(ctx.device) for t in batch)
        loss = F.cross_entropy(model(pixels), labels)
        ctx.step(loss, optimizers[0])
        return {"loss": loss.item(), "items": len(labels)}

    def evaluate(self, model: CnnLstm, data: DataBundle, config: CnnLstmConfig) -> dict[str, Any]:
        """Held-out accuracy, per digit, next to the majority-class baseline."""
        pixels, labels = data.eval
        predicted = self._predict(model, pixels)
        hits = predicted == labels
        return {
            "accuracy": float(hits.mean()),
            "baseline_accuracy": float(np.bincount(labels).max() / len(labels)),
            "per_digit_accuracy": {
                LABELS[d]: float(hits[labels == d].mean()) for d in range(NUM_CLASSES)
            },
            "eval_images": int(len(labels)),
        }

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """Pass at 95% held-out accuracy."""
        acc = metrics["accuracy"]
        passed = acc >= MIN_ACCURACY
        verdict = ">=" if passed else "<"
        return QualityResult(passed, f"held-out accuracy {acc:.3f} {verdict} {MIN_ACCURACY}")

    @staticmethod
    def _predict(model: CnnLstm, pixels: np.ndarray) -> np.ndarray:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(torch.from_numpy(pixels).to(device)).argmax(-1).cpu().numpy()
        finally:
            model.train(was_training)

    # -- inspection -----------------------------------------------------------------------------
    def sample(self, model: CnnLstm, ckpt_dir: Path, config: CnnLstmConfig, options: dict) -> str:
        """Classify a few held-out digits (``options["index"]``, default 0) and draw them."""
        pixels, labels = digit_split(config.holdout, config.split_seed)[1]
        start = int(options.get("index", 0)) % len(labels)
        count = int(options.get("count", 3))
        idx = [(start + i) % len(labels) for i in range(count)]
        predicted = self._predict(model, pixels[idx])
        blocks = []
        for i, guess in zip(idx, predicted):
            art = "\n".join(
                "".join(SHADES[min(int(v * len(SHADES)), len(SHADES) - 1)] * 2 for v in row)
                for row in pixels[i, 0]
            )
            blocks.append(f"held-out digit #{i}: true {labels[i]}, predicted {guess}\n{art}")
        return "\n\n".join(blocks)

    # -- export and serving ---------------------------------------------------------------------
    def export_signature(self, config: CnnLstmConfig, variant: str = "default") -> ExportSignature:
        """``pixels`` (batch, 1, 8, 8) float32 in [0, 1] -> ``logits`` (batch, 10)."""
        return ExportSignature(
            inputs=(TensorSpec("pixels", "float32", ("batch", 1, 8, 8)),),
            outputs=(TensorSpec("logits", "float32", ("batch", NUM_CLASSES)),),
        )

    def export_module(
        self, model: CnnLstm, config: CnnLstmConfig, variant: str = "default"
    ) -> CnnLstm:
        """The model already takes and returns the signature's tensors."""
        return model

    def example_inputs(
        self,
        config: CnnLstmConfig,
        batch: int,
        seq: int,
        past: int,
        seed: int = 0,
        variant: str = "default",
    ) -> dict[str, Any]:
        """Real held-out digits drawn by ``seed`` (``seq``/``past`` unused): realistic logits."""
        pixels = digit_split(config.holdout, config.split_seed)[1][0]
        idx = np.random.default_rng(seed).integers(0, len(pixels), size=batch)
        return {"pixels": np.ascontiguousarray(pixels[idx])}

    def serving_metadata(self, config: CnnLstmConfig, ckpt_dir: Path) -> dict[str, Any]:
        """Label names and the input the runtime feeds (pixels in [0, 1], not text)."""
        return {"labels": LABELS, "input": "pixels", "pixel_range": [0.0, 1.0]}
