"""The offline sklearn digits (1,797 8x8 images), scaled to [-1, 1], split stratified by digit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Digits:
    """Images (N, 1, 8, 8) float32 in [-1, 1] and their digit labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_digit_split(holdout: float, seed: int) -> tuple[Digits, Digits]:
    """Return (train, held-out) digits; the split is stratified so every digit is held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # grey levels are 0..16; tanh outputs [-1, 1], so real images get the same range
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    x_tr, x_ev, y_tr, y_ev = train_test_split(
        images, labels, test_size=holdout, stratify=labels, random_state=seed
    )
    return Digits(x_tr, y_tr), Digits(x_ev, y_ev)


def random_batches(
    data: Digits, batch_size: int, seed: int, rank: int, world_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield random minibatches of this rank's shard forever (with replacement across batches)."""
    shard = np.arange(rank, len(data), world_size)
    rng = np.random.default_rng([seed, rank])  # distinct, reproducible stream per rank
    while True:
        idx = rng.choice(shard, size=batch_size, replace=len(shard) < batch_size)
        yield data.images[idx], data.labels[idx]
