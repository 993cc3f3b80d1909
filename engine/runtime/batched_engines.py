"""Engines for one-shot tasks (``classify``, ``sample_images``) behind the dynamic batcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.runtime.backends import Backend
from engine.runtime.batcher import Arrays, BatcherConfig, DynamicBatcher, concat_rows
from engine.runtime.errors import InvalidSamplingParamsError, ModelSignatureError
from engine.runtime.loader import ModelVersion


class _BatchedEngine:
    """A loaded graph behind a dynamic batcher; subclasses turn requests into rows."""

    task: str

    def __init__(self, model: ModelVersion, backend: Backend, batcher: BatcherConfig | None):
        if model.task != self.task:
            raise ModelSignatureError(
                f"model {model.name!r} serves {model.task!r}, not {self.task!r}"
            )
        self.model, self.backend = model, backend
        self.batcher = DynamicBatcher(backend.run, batcher, self._collate)

    # how requests' rows become one batch; the classifier pads its rows to one width first
    _collate = staticmethod(concat_rows)

    def describe(self) -> dict[str, Any]:
        """Model and batching figures, for the CLI and metrics."""
        return {
            "model": self.model.name,
            "version": self.model.version,
            "task": self.task,
            "batch_sizes": dict(self.batcher.batch_sizes),
        }

    def close(self) -> None:
        """Release the graph."""
        self.model.close()


TYPE_IDS = "token_type_ids"  # BERT's segment ids; fed to graphs that declare the input


def prepare_tokenizer(tokenizer: Any, max_length: int, cls_id: int | None) -> None:
    """Set a classifier tokenizer's truncation so every encoding fits ``max_length`` ids.

    With ``cls_id`` the engine prepends [CLS] itself, so the text keeps ``max_length - 1`` ids.
    Without it the tokenizer's own post-processor adds the special tokens (a Hugging Face BERT
    tokenizer adds [CLS] ... [SEP]) and ``tokenizers`` truncates the text around them, keeping
    the final [SEP] - what transformers' ``tokenizer(text, truncation=True)`` gives. Padding
    is the engine's (to the longest row of a batch), never the tokenizer's.
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length - (0 if cls_id is None else 1))


def encode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    pad_id: int,
    cls_id: int | None = None,
    type_ids: bool = False,
) -> Arrays:
    """``input_ids`` and ``attention_mask`` (and ``token_type_ids``) for a classifier.

    Rows are ``[CLS] + ids`` when ``cls_id`` is given, else what the tokenizer's post-processor
    makes; truncated as :func:`prepare_tokenizer` set; right-padded with ``pad_id``.
    """
    encodings = tokenizer.encode_batch(list(texts))
    head = [] if cls_id is None else [int(cls_id)]
    rows = [head + enc.ids for enc in encodings]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    segments = np.zeros((len(rows), width), np.int64)
    for i, (r, enc) in enumerate(zip(rows, encodings)):
        ids[i, : len(r)] = r
        segments[i, len(head) : len(r)] = enc.type_ids
    lengths = np.array([len(r) for r in rows])
    out = {
        "input_ids": ids,
        "attention_mask": (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64),
    }
    if type_ids:
        out[TYPE_IDS] = segments
    return out


@dataclass
class Classification:
    """One text's predicted label and the top labels with their probabilities."""

    label: str
    score: float
    top: list[tuple[str, float]]


class ClassifierEngine(_BatchedEngine):
    """``classify``: text in, label probabilities out."""

    task = "classify"

    def __init__(self, model: ModelVersion, backend: Backend, batcher: BatcherConfig | None = None):
        from tokenizers import Tokenizer

        super().__init__(model, backend, batcher)
        serving = model.serving
        self.labels: list[str] = list(serving["labels"])
        self.max_length = int(serving["max_length"])
        self.pad_id = int(serving["pad_token_id"])
        self.cls_id = serving.get("cls_token_id")
        self.tokenizer = Tokenizer.from_file(str(model.path / serving["tokenizer"]))
        prepare_tokenizer(self.tokenizer, self.max_length, self.cls_id)
        self.type_ids = TYPE_IDS in getattr(backend, "input_names", ())

    def encode(self, texts: Sequence[str]) -> Arrays:
        """Token ids (see :func:`encode_texts`), right-padded to the longest row."""
        return encode_texts(self.tokenizer, texts, self.pad_id, self.cls_id, self.type_ids)

    def _collate(self, parts: list[Arrays]) -> Arrays:
        width = max(p["input_ids"].shape[1] for p in parts)

        def pad(a: np.ndarray, value: int) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

        fill = {"input_ids": self.pad_id}  # attention_mask and token_type_ids pad with 0
        return {k: np.concatenate([pad(p[k], fill.get(k, 0)) for p in parts]) for k in parts[0]}

    async def classify(self, texts: str | Sequence[str], top_k: int = 5) -> list[Classification]:
        """Classify one text or many; each gets its label and top-``top_k`` probabilities."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        out = await self.batcher.submit(self.encode(texts))
        probs = _softmax(next(iter(out.values())))  # (N, classes)
        order = np.argsort(-probs, axis=1)[:, : max(1, top_k)]
        results = []
        for p, idx in zip(probs, order):
            top = [(self.labels[i], float(p[i])) for i in idx]
            results.append(Classification(top[0][0], top[0][1], top))
        return results


class TensorClassifierEngine(_BatchedEngine):
    """``classify`` of a tensor (``serving.input``, e.g. pixels): rows in, probabilities out."""

    task = "classify"

    def __init__(self, model: ModelVersion, backend: Backend, batcher: BatcherConfig | None = None):
        super().__init__(model, backend, batcher)
        self.labels: list[str] = list(model.serving["labels"])
        self.input_name = str(model.serving["input"])
        spec = next(t for t in model.graph(model.manifest.main_graph or "default")["inputs"])
        self.input_dtype = np.dtype(spec["dtype"])
        self.input_shape = tuple(spec["shape"][1:])  # after the batch axis; strings are dynamic

    async def classify_tensor(self, rows: np.ndarray) -> np.ndarray:
        """Label probabilities (N, labels) of ``rows`` (N, *input shape)."""
        fixed = [d for d in self.input_shape]
        if rows.ndim != 1 + len(fixed) or any(
            isinstance(d, int) and d != a for d, a in zip(fixed, rows.shape[1:])
        ):
            raise InvalidSamplingParamsError(
                f"input {self.input_name!r} must have shape (N, {', '.join(map(str, fixed))}), "
                f"got {tuple(rows.shape)}"
            )
        out = await self.batcher.submit({self.input_name: rows.astype(self.input_dtype)})
        return _softmax(next(iter(out.values())))

    async def classify(self, texts: Any, top_k: int = 5) -> list[Classification]:
        """Refused: this model classifies tensors, not texts."""
        raise ModelSignatureError(
            f"model {self.model.name!r} classifies {self.input_name!r} tensors, not texts; "
            "send that tensor over KServe ModelInfer"
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, (N, classes)."""
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


class ImageEngine(_BatchedEngine):
    """``sample_images``: digits (class labels) in, generated images out."""

    task = "sample_images"

    def __init__(self, model: ModelVersion, backend: Backend, batcher: BatcherConfig | None = None):
        super().__init__(model, backend, batcher)
        serving = model.serving
        self.latent_dim = int(serving["latent_dim"])
        self.num_classes = int(serving["num_classes"])
        self.pixel_range = tuple(serving.get("pixel_range", (-1.0, 1.0)))

    async def sample_images(
        self, labels: int | Sequence[int], n: int = 1, seed: int | None = None
    ) -> np.ndarray:
        """Generate ``n`` images per label; return (len(labels) * n, C, H, W) in ``pixel_range``."""
        labels = [labels] if isinstance(labels, int) else list(labels)
        bad = [d for d in labels if not 0 <= d < self.num_classes]
        if bad or n < 1:
            raise InvalidSamplingParamsError(
                f"labels must be in [0, {self.num_classes}) and n >= 1, got {bad or labels}, n={n}"
            )
        rows = np.repeat(np.asarray(labels, np.int64), n)
        z = np.random.default_rng(seed).standard_normal((len(rows), self.latent_dim))
        out = await self.batcher.submit({"z": z.astype(np.float32), "labels": rows})
        return next(iter(out.values()))


def image_grid(images: np.ndarray, columns: int, scale: int = 8, pad: int = 1) -> np.ndarray:
    """Tile (N, 1, H, W) images in [-1, 1] into one uint8 grayscale grid, each pixel scaled up."""
    tiles = ((images[:, 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    n, h, w = tiles.shape
    rows = -(-n // columns)
    cell_h, cell_w, gap = h * scale, w * scale, pad * scale
    grid = np.zeros((rows * (cell_h + gap) + gap, columns * (cell_w + gap) + gap), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = gap + r * (cell_h + gap), gap + c * (cell_w + gap)
        grid[y : y + cell_h, x : x + cell_w] = np.kron(tile, np.ones((scale, scale), np.uint8))
    return grid
