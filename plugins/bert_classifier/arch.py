"""The ``bert-classifier`` architecture: BERT / DistilBERT sequence classifiers.

Imported from Hugging Face directories (``engine export HF_DIR``; see ``hf.py``) and fine-tuned
from them on the text-classifier's task (``engine train text-classifier --init HF_DIR``, as in
``BertForSequenceClassification.from_pretrained(...)`` followed by fine-tuning): which stdlib
package does a docstring come from? The recipe is the usual one for BERT fine-tuning: AdamW,
linear warmup then linear decay, cross-entropy on the [CLS] head. Trained from scratch (no
``--init``) it learns a small encoder with its own WordPiece tokenizer; that works, but the point
of the architecture is the pretrained encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.architecture import (
    Architecture,
    DataBundle,
    ExportSignature,
    QualityResult,
    StepContext,
    TensorSpec,
)
from plugins.bert_classifier import data as bdata
from plugins.bert_classifier.model import BertClassifier, EncoderShape, ExportWrapper

BAR_MARGIN = 0.20  # the text-classifier's bar: beat the majority class by 20 points
CLS_ID = bdata.SPECIAL.index("[CLS]")


@dataclass
class BertClassifierConfig:
    """A BERT-family classifier's shape (from config.json on import) and its fine-tuning run."""

    layout: str = "bert"  # "bert" or "distilbert": which transformers class it converts to
    vocab_size: int = 8192
    hidden_size: int = 128  # from scratch: a small encoder that trains in minutes on 2 cores
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    type_vocab_size: int = 2  # 0 for DistilBERT, which has no segment embeddings
    layer_norm_eps: float = 1e-12  # BERT's and DistilBERT's
    pooler_activation: str = "tanh"  # BERT's pooler; DistilBERT's pre_classifier is ReLU
    num_labels: int = 10  # the text-classifier task's 10 packages
    pad_token_id: int = 0
    max_length: int = 128  # tokenizer truncation: model_max_length, at most the positions
    dropout: float = 0.1  # BERT's hidden and attention dropout
    # fine-tuning on the docstring task
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-4  # 2e-5..5e-5 for bert-base; small encoders take more
    warmup_steps: int = 60  # 10% of the run, as BERT's recipe
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    heldout_fraction: float = 0.2  # the text-classifier's split
    min_words: int = 3

    def shape(self) -> EncoderShape:
        """The network's fields."""
        names = {f.name for f in fields(EncoderShape)}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
        return EncoderShape(**values)


class BertClassifierArch(Architecture):
    """BERT / DistilBERT for sequence classification, as transformers computes them."""

    name = "bert-classifier"
    task = "classify"
    description = "BERT/DistilBERT classifier (post-LN), imported from Hugging Face or fine-tuned"
    config_class = BertClassifierConfig
    item_unit = "samples"
    trains_as = ("text-classifier",)  # `engine train text-classifier --init BERT_DIR`

    # -- training ---------------------------------------------------------------------------
    def build_model(self, config: BertClassifierConfig) -> BertClassifier:
        """The classifier for ``config``'s shape (random init; --init loads weights after)."""
        return BertClassifier(config.shape())

    def load_data(
        self, config: BertClassifierConfig, cache_dir: Path, artifacts_dir: Path | None
    ) -> DataBundle:
        """Docstrings of the task's packages under the model's tokenizer (or a new WordPiece)."""
        from tokenizers import Tokenizer

        from engine.runtime.batched_engines import prepare_tokenizer

        saved = Path(artifacts_dir) / bdata.TOKENIZER_FILE if artifacts_dir else None
        if saved is not None and saved.is_file():
            tokenizer = Tokenizer.from_file(str(saved))
            prepare_tokenizer(tokenizer, config.max_length, None)
        else:
            tokenizer = bdata.wordpiece_tokenizer(config.vocab_size, config.max_length)
        if tokenizer.get_vocab_size() != config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.get_vocab_size()} ids, not {config.vocab_size}"
            )
        labels_file = Path(artifacts_dir) / bdata.LABELS_FILE if artifacts_dir else None
        labels = bdata.task_labels(config.min_words, config.num_labels, labels_file)
        train, heldout = bdata.labeled_splits(
            tokenizer, labels, config.min_words, config.heldout_fraction, config.pad_token_id
        )
        info = {
            "labels": labels,
            "n_train": len(train.labels),
            "n_eval": len(heldout.labels),
            "train_files": len(train.files),
            "eval_files": len(heldout.files),
        }
        return DataBundle(train, heldout, {"tokenizer": tokenizer, "labels": labels}, info)

    def configure_optimizers(self, model: BertClassifier, config: BertClassifierConfig) -> list:
        """AdamW; no weight decay on biases and LayerNorms. The lr is set every step."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        schedule = {"peak_lr": config.lr, "warmup": config.warmup_steps, "total": config.steps}
        return [torch.optim.AdamW([{**g, **schedule} for g in groups], lr=config.lr)]

    def train_batches(
        self, data: DataBundle, config: BertClassifierConfig, seed: int, rank: int, world_size: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled epochs of this rank's docstrings, each batch cut to its longest row."""
        train: bdata.Encoded = data.train
        rng = np.random.default_rng([seed, rank])
        shard = np.arange(rank, len(train.labels), world_size)
        while True:
            order = rng.permutation(shard)
            for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
                idx = order[start : start + config.batch_size]
                width = int(train.lengths[idx].max())
                yield {
                    "input_ids": torch.from_numpy(train.ids[idx, :width]),
                    "attention_mask": torch.from_numpy(train.mask[idx, :width]),
                    "labels": torch.from_numpy(train.labels[idx]),
                }

    def training_step(
        self, model: BertClassifier, batch: dict, optimizers: list, ctx: StepContext
    ) -> dict[str, float]:
        """Cross-entropy on the [CLS] head at the scheduled learning rate."""
        (opt,) = optimizers
        lr = _lr(opt.param_groups[0], ctx.step_index)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device))
        loss = F.cross_entropy(logits, batch["labels"].to(ctx.device))
        ctx.step(loss, opt)
        return {"loss": float(loss.detach()), "items": len(batch["labels"]), "lr": lr}

    def evaluate(
        self, model: BertClassifier, data: DataBundle, config: BertClassifierConfig
    ) -> dict[str, Any]:
        """Held-out accuracy against the majority class and TF-IDF + logistic regression."""
        from plugins.text_classifier.arch import predict, tfidf_baseline

        heldout: bdata.Encoded = data.eval
        train: bdata.Encoded = data.train
        pred = predict(model, heldout.ids, heldout.lengths)
        accuracy = float((pred == heldout.labels).mean())
        majority = float(np.bincount(heldout.labels).max() / len(heldout.labels))
        tfidf = tfidf_baseline(train.texts, train.labels, heldout.texts, heldout.labels)
        return {
            "accuracy": round(accuracy, 4),
            "majority_accuracy": round(majority, 4),
            "tfidf_logreg_accuracy": round(tfidf, 4),
            "n_train": len(train.labels),
            "n_eval": len(heldout.labels),
            "n_params": sum(p.numel() for p in model.parameters()),
        }

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """The text-classifier's bar: held-out accuracy >= majority class + 0.20."""
        acc, maj = metrics["accuracy"], metrics["majority_accuracy"]
        return QualityResult(
            acc >= maj + BAR_MARGIN,
            f"held-out accuracy {acc:.3f} vs majority class {maj:.3f} (needs >= "
            f"{maj + BAR_MARGIN:.3f}); TF-IDF + logistic regression "
            f"{metrics['tfidf_logreg_accuracy']:.3f}",
        )

    def save_artifacts(self, data: DataBundle, out_dir: Path) -> None:
        """The tokenizer (truncation cleared: serving sets its own) and the label names."""
        from engine.atomic import write_bytes, write_json

        tokenizer = data.artifacts["tokenizer"]
        raw = json.loads(tokenizer.to_str())
        raw["truncation"] = raw["padding"] = None
        write_bytes(Path(out_dir) / bdata.TOKENIZER_FILE, json.dumps(raw).encode())
        write_json(Path(out_dir) / bdata.LABELS_FILE, list(data.artifacts["labels"]))

    # -- inspection ----------------------------------------------------------------------------
    def sample(
        self, model: BertClassifier, ckpt_dir: Path, config: BertClassifierConfig, options: dict
    ) -> str:
        """Classify ``options["text"]``; list every label with its probability."""
        from tokenizers import Tokenizer

        from engine.runtime.batched_engines import encode_texts, prepare_tokenizer

        tokenizer = Tokenizer.from_file(str(Path(ckpt_dir) / bdata.TOKENIZER_FILE))
        prepare_tokenizer(tokenizer, config.max_length, None)
        labels = json.loads((Path(ckpt_dir) / bdata.LABELS_FILE).read_text())
        text = options.get("text") or "Return the event loop for the current OS thread."
        feeds = encode_texts(tokenizer, [text], config.pad_token_id)
        with torch.no_grad():
            x = {k: torch.from_numpy(v) for k, v in feeds.items()}
            probs = torch.softmax(model(x["input_ids"], x["attention_mask"]), dim=-1)[0]
        order = probs.argsort(descending=True).tolist()
        return "\n".join([f"text: {text!r}"] + [f"  {labels[i]:<16} {probs[i]:.3f}" for i in order])

    # -- export and serving ------------------------------------------------------------------
    def export_signature(
        self, config: BertClassifierConfig, variant: str = "default"
    ) -> ExportSignature:
        """Token ids, the mask and (BERT) segment ids in; class logits out."""
        tokens = ("batch", "sequence")
        inputs = [TensorSpec("input_ids", "int64", tokens)]
        inputs.append(TensorSpec("attention_mask", "int64", tokens))
        if config.type_vocab_size > 0:
            inputs.append(TensorSpec("token_type_ids", "int64", tokens))
        outputs = (TensorSpec("logits", "float32", ("batch", config.num_labels)),)
        # fp32 onnxruntime vs torch: ~1e-6 on logits of a few units (measured); 1e-4 is the
        # bar the transformers comparison uses too
        return ExportSignature(tuple(inputs), outputs, atol=1e-4, rtol=1e-4)

    def export_module(
        self, model: BertClassifier, config: BertClassifierConfig, variant: str = "default"
    ) -> torch.nn.Module:
        """``forward(input_ids, attention_mask[, token_type_ids]) -> logits``."""
        return ExportWrapper(model).eval()

    def example_inputs(
        self,
        config: BertClassifierConfig,
        batch: int,
        seq: int,
        past: int,
        seed: int = 0,
        variant: str = "default",
    ) -> dict[str, np.ndarray]:
        """Right-padded rows of uneven length starting with [CLS]; segment 1 in some rows."""
        rng = np.random.default_rng(seed)
        seq = max(2, min(seq, config.max_length))
        lengths = rng.integers(2, seq + 1, batch)
        lengths[0] = seq  # one full row so the graph sees the whole width
        low = min(len(bdata.SPECIAL), config.vocab_size - 1)
        ids = rng.integers(low, config.vocab_size, (batch, seq)).astype(np.int64)
        ids[:, 0] = min(CLS_ID, config.vocab_size - 1)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        ids[mask == 0] = config.pad_token_id
        out = {"input_ids": ids, "attention_mask": mask}
        if config.type_vocab_size > 0:  # a second segment in the back half of odd rows
            second = (np.arange(seq)[None, :] >= lengths[:, None] // 2) & (mask == 1)
            second &= (np.arange(batch) % 2 == 1)[:, None]
            out["token_type_ids"] = (second & (config.type_vocab_size > 1)).astype(np.int64)
        return out

    def serving_metadata(self, config: BertClassifierConfig, ckpt_dir: Path) -> dict[str, Any]:
        """Labels in logit order, the truncation length; the tokenizer adds [CLS] and [SEP]."""
        return {
            "labels": json.loads((Path(ckpt_dir) / bdata.LABELS_FILE).read_text()),
            "max_length": config.max_length,
            "pad_token_id": config.pad_token_id,
            "cls_token_id": None,  # the tokenizer's post-processor adds [CLS] ... [SEP]
            "tokenizer": bdata.TOKENIZER_FILE,
        }

    def artifact_files(self, ckpt_dir: Path) -> list[Path]:
        """The tokenizer and the label names."""
        return [Path(ckpt_dir) / bdata.TOKENIZER_FILE, Path(ckpt_dir) / bdata.LABELS_FILE]


def _lr(group: dict[str, Any], step: int) -> float:
    """Linear warmup to the peak, then linear decay to 0 at the last step (BERT's schedule)."""
    peak, warm, total = group["peak_lr"], group["warmup"], group["total"]
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))
