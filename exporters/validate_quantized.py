"""Accuracy of a quantized export against fp32 PyTorch, on held-out data, with floors that fail.

A quantized graph cannot reproduce PyTorch to rounding error, so instead of greedy tokens or
labels being identical, it has to lose at most a bounded amount of accuracy on data no training
step saw (``Architecture.heldout_examples``):

* ``generate``: teacher-forced top-1 agreement with fp32 >= 98% and held-out cross-entropy at most
  0.05 nats/token above fp32's, through every graph (each drives its own cache layout);
* ``classify``: held-out accuracy at most 1 point below fp32's.

Below a floor the export fails with :class:`QuantizedAccuracyTooLow` and nothing lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.graph_decoder import GraphDecoder
from exporters.base import QuantizedAccuracyTooLow, ValidationError

MIN_TOP1_AGREEMENT = 0.98  # LM: teacher-forced top-1 agreement with fp32
MAX_CE_INCREASE = 0.05  # LM: held-out cross-entropy increase, nats/token
MAX_ACCURACY_DROP = 0.01  # classifier: held-out accuracy drop (1 point)
LM_CHUNK = 8  # windows per call: (8, 128, vocab) logits stay tens of MB
CLASSIFY_CHUNK = 64


class QuantizedCheck:
    """Score graphs one by one against fp32 on the architecture's held-out examples.

    The fp32 side (PyTorch through the first graph's wrapper) is computed once, at the first
    graph, and kept as its top-1 tokens and target log-probs, so no session stays open for
    the next graph's sake.
    """

    def __init__(self, arch, config, ckpt_dir: Path):
        examples = arch.heldout_examples(config, Path(ckpt_dir))
        if examples is None:
            raise ValidationError(
                f"{arch.name} provides no held-out examples (Architecture.heldout_examples), so "
                "a quantized export cannot be checked against fp32; export with --no-validate "
                "to skip"
            )
        if arch.task not in ("generate", "classify"):
            raise ValidationError(f"no accuracy check for quantized {arch.task!r} models")
        self.arch, self.config = arch, config
        self.feeds, self.targets = examples[0], np.asarray(examples[1])
        self.graphs: dict[str, dict] = {}
        self._fp32: list[tuple[np.ndarray, np.ndarray]] | None = None  # LM: per chunk

    def add(self, variant: str, g: dict) -> None:
        """Score one graph (its ``signature``, ``onnx`` and ``torch`` runners)."""
        if self.arch.task == "generate":
            self._add_lm(variant, g)
        else:
            self._add_classifier(variant, g)

    def result(self) -> dict:
        """The manifest's figures for every graph added."""
        if self.arch.task == "generate":
            count = int(self._scored().sum())
            floors = {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_ce_increase": MAX_CE_INCREASE}
            return {"heldout_positions": count, "floors": floors, "graphs": self.graphs}
        return {
            "heldout_rows": int(len(self.targets)),
            "floors": {"max_accuracy_drop": MAX_ACCURACY_DROP},
            "graphs": self.graphs,
        }

    # -- language models ------------------------------------------------------------------------
    def _scored(self) -> np.ndarray:
        return (np.asarray(self.feeds["attention_mask"]) == 1) & (self.targets >= 0)

    def _add_lm(self, variant: str, g: dict) -> None:
        ids, mask = np.asarray(self.feeds["input_ids"]), np.asarray(self.feeds["attention_mask"])
        example = self.arch.example_inputs(self.config, 1, 1, 0, seed=0, variant=variant)
        decoder = GraphDecoder(g["signature"], {k: v.shape for k, v in example.items()})
        scored = self._scored()
        if self._fp32 is None:  # PyTorch through the main (first) graph's wrapper
            self._fp32 = []
            for start in range(0, len(ids), LM_CHUNK):
                rows = slice(start, start + LM_CHUNK)
                target = np.where(scored[rows], self.targets[rows], 0)[..., None]
                ref = log_softmax(decoder.prefill_logits(g["torch"], ids[rows], mask[rows]))
                self._fp32.append((ref.argmax(-1), -np.take_along_axis(ref, target, -1)[..., 0]))
                del ref
        s = {"agree": 0, "nll_fp32": 0.0, "nll": 0.0}
        for i, start in enumerate(range(0, len(ids), LM_CHUNK)):
            rows = slice(start, start + LM_CHUNK)
            valid = scored[rows]
            target = np.where(valid, self.targets[rows], 0)[..., None]
            ref_top, ref_nll = self._fp32[i]
            got = log_softmax(decoder.prefill_logits(g["onnx"], ids[rows], mask[rows]))
            s["agree"] += int((got.argmax(-1) == ref_top)[valid].sum())
            s["nll_fp32"] += float(ref_nll[valid].sum())
            s["nll"] += float(-np.take_along_axis(got, target, -1)[..., 0][valid].sum())
            del got
        count = int(scored.sum())
        entry = {
            "top1_agreement": s["agree"] / count,
            "ce_fp32": s["nll_fp32"] / count,
            "ce_quantized": s["nll"] / count,
        }
        entry["ce_increase"] = entry["ce_quantized"] - entry["ce_fp32"]
        self.graphs[variant] = entry
        if entry["top1_agreement"] < MIN_TOP1_AGREEMENT or entry["ce_increase"] > MAX_CE_INCREASE:
            raise QuantizedAccuracyTooLow(
                f"graph {variant!r} (quantized): teacher-forced top-1 agreement with fp32 "
                f"{entry['top1_agreement']:.2%} (floor {MIN_TOP1_AGREEMENT:.0%}), held-out "
                f"cross-entropy +{entry['ce_increase']:.3f} nats/token (ceiling "
                f"{MAX_CE_INCREASE}) over {count} held-out positions; export in fp32"
            )

    # -- classifiers ----------------------------------------------------------------------------
    def _add_classifier(self, variant: str, g: dict) -> None:
        labels, feeds = self.targets, self.feeds
        name = g["signature"].output_names()[0]
        got, ref = [], []
        for start in range(0, len(labels), CLASSIFY_CHUNK):
            rows = slice(start, start + CLASSIFY_CHUNK)
            chunk = _trimmed({k: np.asarray(v)[rows] for k, v in feeds.items()})
            got.append(g["onnx"](chunk)[name].argmax(-1))
            ref.append(g["torch"](chunk)[name].argmax(-1))
        got_all, ref_all = np.concatenate(got), np.concatenate(ref)
        entry = {
            "accuracy_fp32": float((ref_all == labels).mean()),
            "accuracy_quantized": float((got_all == labels).mean()),
            "label_agreement": float((got_all == ref_all).mean()),
        }
        entry["accuracy_drop"] = entry["accuracy_fp32"] - entry["accuracy_quantized"]
        self.graphs[variant] = entry
        if entry["accuracy_drop"] > MAX_ACCURACY_DROP:
            raise QuantizedAccuracyTooLow(
                f"graph {variant!r} (quantized): held-out accuracy "
                f"{entry['accuracy_quantized']:.2%} vs fp32 {entry['accuracy_fp32']:.2%}, "
                "a drop of "
                f"{100 * entry['accuracy_drop']:.1f} points over {len(labels)} rows (ceiling "
                f"{100 * MAX_ACCURACY_DROP:.0f}); export in fp32"
            )


def check_quantized(arch, config, ckpt_dir: Path, graphs: dict[str, dict]) -> dict[str, Any]:
    """Score every graph against fp32 on the architecture's held-out examples; fail below floors."""
    check = QuantizedCheck(arch, config, ckpt_dir)
    for variant, g in graphs.items():
        check.add(variant, g)
    return check.result()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _trimmed(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut right padding shared by every row of a chunk (rows come sorted by length)."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return feeds
    width = max(1, int(mask.sum(axis=1).max()))
    return {k: v[:, :width] if v.shape == mask.shape else v for k, v in feeds.items()}
