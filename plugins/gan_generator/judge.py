"""The judge: a classifier trained on real digits only, used to score generated samples."""

from __future__ import annotations

import numpy as np

from plugins.gan_generator.data import Digits


def train_judge(train: Digits):
    """Fit an RBF SVM on real training digits (about 99% held-out accuracy in under a second)."""
    from sklearn.svm import SVC

    judge = SVC(C=10.0, gamma="scale")
    judge.fit(train.images.reshape(len(train), -1), train.labels)
    return judge


def judge_predict(judge, images: np.ndarray) -> np.ndarray:
    """Predict digits for images (N, 1, 8, 8) on the [-1, 1] scale."""
    return judge.predict(np.asarray(images, dtype=np.float32).reshape(len(images), -1))


def within_class_distance(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean Euclidean distance between distinct images of the same digit, averaged over digits.

    A collapsed generator draws near-identical images for a digit, so this drops towards 0.
    """
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    per_class = []
    for digit in np.unique(labels):
        x = flat[labels == digit]
        sq = (x * x).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)  # (n, n)
        n = len(x)
        per_class.append(np.sqrt(d2).sum() / (n * (n - 1)))  # the zero diagonal is excluded
    return float(np.mean(per_class))
