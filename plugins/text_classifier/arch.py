"""The ``text-classifier`` architecture: which stdlib package does this docstring come from?

The default run: token embeddings start from LSA over the unlabeled stdlib source (``init_weights``,
plugins/text_classifier/lsa.py: tokens used in the same files start close together), then the
encoder and its mean-pooled head are fine-tuned on labeled docstrings for ``finetune_steps``.
Held-out accuracy 0.693 in 600 steps (one process, seed 0) against 0.547 for the earlier default
(600 MLM + 600 fine-tuning steps, [CLS] head) and 0.658 for TF-IDF + logistic regression; the
README gives the figure of ``engine train text-classifier`` itself.

Optional phase 1 (``--config pretrain_steps=N``): masked-language-model pretraining of the
encoder on the same unlabeled source; ``training_step`` picks the phase from the step index.
Pretraining also asks [CLS] for its window's bag of words, because MLM alone leaves the position
a [CLS] head reads untrained. What it bought at this budget (2 CPU cores, 4x128 encoder, 600
fine-tuning steps): nothing. The MLM loss was still near the unigram entropy after 1.5k steps,
and held-out accuracy was 0.63 from a random init against 0.57 after 400-1500 pretraining steps;
LSA gives the embeddings the file-level co-occurrence MLM did not learn, in seconds of CPU.

Optimizer choice: one AdamW over all parameters. Each param group carries the two-phase
learning-rate schedule (``training_step`` gets no config, and keys in a param group survive
``state_dict()`` and resume), the rate is set from it every step, and the Adam moments are
cleared at the phase switch so fine-tuning starts as fresh as a new optimizer would.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
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
from plugins.stdlib_text import (
    CLS,
    EOT,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    encode_files,
    split_files,
    stdlib_files,
    train_tokenizer,
)
from plugins.text_classifier import data as textdata
from plugins.text_classifier.model import ExportWrapper, TextClassifier

TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
BAR_MARGIN = 0.20  # held-out accuracy must beat the majority class by 20 points


@dataclass
class TextClassifierConfig:
    """The default run: 600 steps, held-out 0.686 in 9m37s on 2 shared CPU cores (464 s CPU)."""

    # data
    num_classes: int = 10  # the largest multi-file stdlib packages (by docstring count)
    heldout_fraction: float = 0.2  # of each class's docstrings, whole files at a time
    min_words: int = 3  # "Return self." says nothing about its package
    vocab_size: int = 8192  # the shared stdlib BPE tokenizer
    max_len: int = 64  # [CLS] + 63 tokens: the median docstring is ~24 tokens
    # model: small enough that both phases fit a few CPU minutes (256 wide costs 3x per step)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1
    # the head reads the mean of the tokens: 0.693 held-out where the [CLS] position read 0.547
    pooling: str = "mean"  # or "cls"
    # Token embeddings' first lsa_dim dims start from LSA over the unlabeled stdlib source
    # (plugins/text_classifier/lsa.py, seconds of CPU): tokens of one package's files start
    # close together, which 600 MLM steps did not teach (0 turns it off).
    lsa_dim: int = 64  # at most d_model
    lsa_scale: float = 1.0  # length of each token's LSA part (random init rows are ~0.23 long)
    # phase 1 (optional): masked-language-model pretraining on unlabeled stdlib source; off by
    # default: LSA gives the embeddings what it taught, at a fraction of the CPU
    pretrain_steps: int = 0
    mlm_batch_size: int = 32
    mlm_len: int = 64  # tokens per pretraining window, [CLS] included (<= max_len)
    mlm_prob: float = 0.15  # BERT's rate; of those 80% [MASK], 10% random, 10% kept
    pretrain_lr: float = 1e-3
    cls_bow_weight: float = 1.0  # [CLS] predicts its window's bag of words (why: see the loss)
    # phase 2: fine-tuning on labeled docstrings
    finetune_steps: int = 600
    batch_size: int = 32
    finetune_lr: float = 5e-4  # 2e-3 fits faster but generalises worse after pretraining
    warmup_steps: int = 50  # per phase
    weight_decay: float = 0.01
    grad_clip: float = 1.0


def _lr(group: dict[str, Any], step: int) -> float:
    """Linear warmup then cosine decay to 10% within each phase."""
    pre = group["pretrain_steps"]
    if step < pre:
        peak, t, n = group["pretrain_lr"], step, pre
    else:
        peak, t, n = group["finetune_lr"], step - pre, group["finetune_steps"]
    warm = min(group["warmup_steps"], max(n // 10, 1))
    if t < warm:
        return peak * (t + 1) / warm
    frac = min((t - warm) / max(n - warm, 1), 1.0)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * frac)))


class TextClassifierArch(Architecture):
    """Transformer encoder, LSA-initialised (optionally MLM-pretrained), then fine-tuned to name a
    docstring's stdlib package."""

    name = "text-classifier"
    task = "classify"
    description = "pre-LN transformer encoder, LSA-initialised embeddings: docstring -> package"
    config_class = TextClassifierConfig
    item_unit = "samples"

    # -- training ---------------------------------------------------------------------------
    def steps(self, config: TextClassifierConfig) -> int:
        """Both phases: pretraining then fine-tuning."""
        return config.pretrain_steps + config.finetune_steps

    def with_steps(self, config: TextClassifierConfig, steps: int) -> TextClassifierConfig:
        """Scale both phases to ``steps`` in total, keeping their ratio."""
        pre = round(steps * config.pretrain_steps / max(self.steps(config), 1))
        return dataclasses.replace(config, pretrain_steps=pre, finetune_steps=steps - pre)

    def build_model(self, config: TextClassifierConfig) -> TextClassifier:
        """Build the encoder with both heads."""
        return TextClassifier(
            vocab_size=config.vocab_size,
            num_classes=config.num_classes,
            max_len=config.max_len,
            n_layer=config.n_layer,
            n_head=config.n_head,
            d_model=config.d_model,
            dropout=config.dropout,
            pooling=config.pooling,
        )

    def load_data(
        self, config: TextClassifierConfig, cache_dir: Path, artifacts_dir: Path | None
    ) -> DataBundle:
        """Labeled docstring splits and the MLM token stream, all from the local stdlib."""
        from tokenizers import Tokenizer

        train_files = split_files(stdlib_files())[0]
        if artifacts_dir and (Path(artifacts_dir) / TOKENIZER_FILE).exists():
            tok = Tokenizer.from_file(str(Path(artifacts_dir) / TOKENIZER_FILE))
        else:
            tok = train_tokenizer(train_files, config.vocab_size)
        if tok.get_vocab_size() != config.vocab_size:
            raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids, not {config.vocab_size}")
        docs = textdata.all_docstrings(config.min_words)
        if artifacts_dir and (Path(artifacts_dir) / LABELS_FILE).exists():
            labels = json.loads((Path(artifacts_dir) / LABELS_FILE).read_text())
        else:
            labels = textdata.choose_labels(docs, config.num_classes)
        train, heldout, held_files = textdata.labeled_splits(
            tok, labels, config.min_words, config.heldout_fraction, config.max_len
        )
        # No leakage: the MLM text is the stdlib train split *minus* every file whose docstrings
        # are held out for the classifier, so pretraining never reads a held-out docstring.
        # (The shared BPE merges were fitted on those files too; they carry no labels.)
        mlm_files = [f for f in train_files if f.rel not in held_files]
        stream = encode_files(tok, mlm_files, "textcls-mlm")
        info = {
            "labels": labels,
            "n_classes": len(labels),
            "n_train": len(train.labels),
            "n_eval": len(heldout.labels),
            "train_files": len(train.files),
            "eval_files": len(heldout.files),
            "train_counts": np.bincount(train.labels, minlength=len(labels)).tolist(),
            "eval_counts": np.bincount(heldout.labels, minlength=len(labels)).tolist(),
            "mlm_files": len(mlm_files),
            "mlm_tokens": int(stream.size),
        }
        return DataBundle(
            train={"labeled": train, "stream": stream, "mlm_files": [f.rel for f in mlm_files]},
            eval=heldout,
            artifacts={"tokenizer": tok, "labels": labels},
            info=info,
        )

    def init_weights(
        self, model: TextClassifier, data: DataBundle, config: TextClassifierConfig
    ) -> None:
        """Token embeddings' first ``lsa_dim`` dims from LSA over the MLM text (no labels)."""
        dim = min(config.lsa_dim, config.d_model)  # a narrower model takes LSA in every dim
        if dim <= 0:
            return
        from plugins.text_classifier.lsa import lsa_vectors

        eot = SPECIAL_TOKENS.index(EOT)
        vectors = lsa_vectors(data.train["stream"], eot, config.vocab_size, dim)
        with torch.no_grad():
            weight = model.tok_emb.weight  # (vocab, d_model)
            weight[:, :dim] = torch.from_numpy(vectors * config.lsa_scale)

    def configure_optimizers(self, model: TextClassifier, config: TextClassifierConfig) -> list:
        """One AdamW; no weight decay on biases and LayerNorms (the 1-D tensors)."""
        params = [p for p in model.parameters() if p.requires_grad]
        schedule = {
            "pretrain_steps": config.pretrain_steps,
            "finetune_steps": config.finetune_steps,
            "pretrain_lr": config.pretrain_lr,
            "finetune_lr": config.finetune_lr,
            "warmup_steps": config.warmup_steps,
            "cls_bow_weight": config.cls_bow_weight,
        }
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(
            [{**g, **schedule} for g in groups], lr=config.pretrain_lr, betas=(0.9, 0.98)
        )
        return [opt]

    def train_batches(
        self, data: DataBundle, config: TextClassifierConfig, seed: int, rank: int, world_size: int
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield dicts holding an MLM batch and a labeled batch; the step uses its phase's half."""
        rng = np.random.default_rng([seed, rank])
        labeled: textdata.LabeledSplit = data.train["labeled"]
        stream = data.train["stream"]
        shard = np.arange(rank, len(labeled.labels), world_size)  # each rank its own docstrings
        mask_id, window = SPECIAL_TOKENS.index(MASK), min(config.mlm_len, config.max_len) - 1
        pending: list[np.ndarray] = []
        while True:
            # MLM: random windows of the stream behind [CLS], mlm_prob of their tokens to predict
            starts = rng.integers(0, stream.size - window, config.mlm_batch_size)
            ids = np.stack([stream[s : s + window] for s in starts]).astype(np.int64)
            chosen = rng.random(ids.shape) < config.mlm_prob
            targets = np.where(chosen, ids, -100)
            roll = rng.random(ids.shape)
            ids = np.where(chosen & (roll < 0.8), mask_id, ids)
            random_ids = rng.integers(len(SPECIAL_TOKENS), config.vocab_size, ids.shape)
            ids = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
            cls = np.full((len(ids), 1), SPECIAL_TOKENS.index(CLS), np.int64)
            mlm_ids = np.concatenate([cls, ids], axis=1)
            mlm_targets = np.concatenate([np.full_like(cls, -100), targets], axis=1)
            # labeled: an epoch of this rank's shard at a time, cut into batches of similar
            # length (sorted within chunks of 32 batches) so little compute goes to padding
            if not pending:
                pending = _bucketed_batches(rng, shard, labeled.lengths, config.batch_size)
            idx = pending.pop()
            width = int(labeled.lengths[idx].max())
            yield {
                "mlm_ids": torch.from_numpy(mlm_ids),
                "mlm_targets": torch.from_numpy(mlm_targets),
                "input_ids": torch.from_numpy(labeled.ids[idx, :width]),
                "attention_mask": torch.from_numpy(_mask(labeled.lengths[idx], width)),
                "labels": torch.from_numpy(labeled.labels[idx]),
            }

    def training_step(
        self, model: TextClassifier, batch: dict, optimizers: list, ctx: StepContext
    ) -> dict[str, float]:
        """An MLM step before ``pretrain_steps``, a classification step after."""
        (opt,) = optimizers
        pretraining = ctx.step_index < opt.param_groups[0]["pretrain_steps"]
        if ctx.step_index == opt.param_groups[0]["pretrain_steps"]:
            opt.state.clear()  # fresh Adam moments for the new objective
        for group in opt.param_groups:
            group["lr"] = _lr(group, ctx.step_index)
        dev = ctx.device
        if pretraining:
            ids, targets = batch["mlm_ids"].to(dev), batch["mlm_targets"].to(dev)
            hidden = model.encode(ids, torch.ones_like(ids))
            picked = targets != -100
            loss = F.cross_entropy(model.mlm_logits(hidden[picked]), targets[picked])
            weight = opt.param_groups[0]["cls_bow_weight"]
            if weight:
                loss = loss + weight * _cls_bag_of_words_loss(model, hidden, ids, targets)
        else:
            logits = model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
            loss = F.cross_entropy(logits, batch["labels"].to(dev))
            ids = batch["input_ids"]
        ctx.step(loss, opt)
        return {"loss": float(loss.detach()), "items": len(ids), "phase": float(not pretraining)}

    def evaluate(
        self, model: TextClassifier, data: DataBundle, config: TextClassifierConfig
    ) -> dict[str, Any]:
        """Held-out accuracy against the best constant guess and a TF-IDF + logistic regression."""
        heldout: textdata.LabeledSplit = data.eval
        train: textdata.LabeledSplit = data.train["labeled"]
        pred = predict(model, heldout.ids, heldout.lengths)
        accuracy = float((pred == heldout.labels).mean())
        majority = float(np.bincount(heldout.labels).max() / len(heldout.labels))
        tfidf = tfidf_baseline(train.texts, train.labels, heldout.texts, heldout.labels)
        return {
            "accuracy": round(accuracy, 4),
            "majority_accuracy": round(majority, 4),
            "tfidf_logreg_accuracy": round(tfidf, 4),
            "better": "model" if accuracy > tfidf else "tfidf_logreg",
            "n_train": len(train.labels),
            "n_eval": len(heldout.labels),
            "n_classes": len(data.artifacts["labels"]),
        }

    def quality_bar(self, metrics: dict[str, Any]) -> QualityResult:
        """Pass when held-out accuracy beats the majority class by BAR_MARGIN or more."""
        acc, maj = metrics["accuracy"], metrics["majority_accuracy"]
        tfidf = metrics["tfidf_logreg_accuracy"]
        return QualityResult(
            acc >= maj + BAR_MARGIN,
            f"held-out accuracy {acc:.3f} vs majority class {maj:.3f} (needs >= "
            f"{maj + BAR_MARGIN:.3f}); TF-IDF + logistic regression {tfidf:.3f}",
        )

    def save_artifacts(self, data: DataBundle, out_dir: Path) -> None:
        """Write the tokenizer and the ordered label names next to the weights."""
        from engine.atomic import write_bytes, write_json

        write_bytes(Path(out_dir) / TOKENIZER_FILE, data.artifacts["tokenizer"].to_str().encode())
        write_json(Path(out_dir) / LABELS_FILE, list(data.artifacts["labels"]))

    # -- inspection ----------------------------------------------------------------------------
    def sample(
        self, model: TextClassifier, ckpt_dir: Path, config: TextClassifierConfig, options: dict
    ) -> str:
        """Classify ``options["text"]``; list the ``top_k`` labels (0: all) with probabilities."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(ckpt_dir) / TOKENIZER_FILE))
        labels = json.loads((Path(ckpt_dir) / LABELS_FILE).read_text())
        text = options.get("text") or "Return the event loop for the current OS thread."
        ids, lengths = textdata.encode_texts(tok, [text], config.max_len)
        model.eval()
        with torch.no_grad():
            ids_t = torch.from_numpy(ids[:, : lengths[0]]).to(next(model.parameters()).device)
            probs = torch.softmax(model(ids_t, torch.ones_like(ids_t)), dim=-1)[0].cpu()
        k = int(options.get("top_k") or 0)
        top = torch.topk(probs, k=min(k, len(labels)) if k > 0 else len(labels))
        lines = [f"text: {text!r}"]
        lines += [f"  {labels[i]:<16} {p:.3f}" for p, i in zip(top.values, top.indices.tolist())]
        return "\n".join(lines)

    # -- export and serving ------------------------------------------------------------------
    def export_signature(
        self, config: TextClassifierConfig, variant: str = "default"
    ) -> ExportSignature:
        """Token ids and a 1/0 mask in, class logits out."""
        return ExportSignature(
            inputs=(
                TensorSpec("input_ids", "int64", ("batch", "sequence")),
                TensorSpec("attention_mask", "int64", ("batch", "sequence")),
            ),
            outputs=(TensorSpec("logits", "float32", ("batch", config.num_classes)),),
        )

    def export_module(
        self, model: TextClassifier, config: TextClassifierConfig, variant: str = "default"
    ) -> torch.nn.Module:
        """``forward(input_ids, attention_mask) -> logits``."""
        return ExportWrapper(model).eval()

    def example_inputs(
        self,
        config: TextClassifierConfig,
        batch: int,
        seq: int,
        past: int,
        seed: int = 0,
        variant: str = "default",
    ) -> dict[str, np.ndarray]:
        """Rows of uneven length, right-padded, each starting with [CLS] (``past`` is ignored)."""
        rng = np.random.default_rng(seed)
        seq = max(2, min(seq, config.max_len))
        lengths = rng.integers(2, seq + 1, batch)
        lengths[0] = seq  # one full row so the graph sees the whole width
        ids = rng.integers(len(SPECIAL_TOKENS), config.vocab_size, (batch, seq)).astype(np.int64)
        ids[:, 0] = SPECIAL_TOKENS.index(CLS)
        mask = _mask(lengths, seq)
        ids[mask == 0] = SPECIAL_TOKENS.index(PAD)
        return {"input_ids": ids, "attention_mask": mask}

    def serving_metadata(self, config: TextClassifierConfig, ckpt_dir: Path) -> dict[str, Any]:
        """Labels in logit order, the longest input, and the special ids the client needs."""
        return {
            "labels": json.loads((Path(ckpt_dir) / LABELS_FILE).read_text()),
            "max_length": config.max_len,
            "pad_token_id": SPECIAL_TOKENS.index(PAD),
            "cls_token_id": SPECIAL_TOKENS.index(CLS),
            "tokenizer": TOKENIZER_FILE,
        }

    def artifact_files(self, ckpt_dir: Path) -> list[Path]:
        """The tokenizer and the label names."""
        return [Path(ckpt_dir) / TOKENIZER_FILE, Path(ckpt_dir) / LABELS_FILE]

    def heldout_examples(
        self, config: TextClassifierConfig, ckpt_dir: Path
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The held-out docstrings (whole files never trained on), shortest first, and labels."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(ckpt_dir) / TOKENIZER_FILE))
        labels = json.loads((Path(ckpt_dir) / LABELS_FILE).read_text())
        heldout = textdata.labeled_splits(
            tok, labels, config.min_words, config.heldout_fraction, config.max_len
        )[1]
        order = np.argsort(heldout.lengths, kind="stable")  # rows of a chunk share a width
        ids, lengths = heldout.ids[order], heldout.lengths[order]
        width = int(lengths.max())
        return {"input_ids": ids[:, :width], "attention_mask": _mask(lengths, width)}, (
            heldout.labels[order]
        )


def _mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """A (N, width) int64 mask: 1 for the first ``length`` positions of each row, 0 after."""
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def _cls_bag_of_words_loss(
    model: TextClassifier, hidden: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the [CLS] position's vocabulary distribution against the window's words.

    MLM alone never trains [CLS] (it is never a target) and teaches attention to look at close
    neighbours, so the fine-tuning head would start from a position that summarises nothing.
    Asking [CLS] for the bag of (unmasked) words of its window teaches it to aggregate the whole
    input, which is what the classifier reads. It reuses the MLM head: one more row per window.
    """
    original = torch.where(targets != -100, targets, ids)[:, 1:]  # (B, T-1) the window's tokens
    bag = torch.zeros(len(ids), model.tok_emb.num_embeddings, device=ids.device)
    bag.scatter_add_(1, original, torch.ones_like(original, dtype=bag.dtype))
    bag = bag / bag.sum(-1, keepdim=True)  # (B, vocab)
    log_probs = F.log_softmax(model.mlm_logits(hidden[:, 0]), dim=-1)  # (B, vocab)
    return -(bag * log_probs).sum(-1).mean()


def _bucketed_batches(
    rng: np.random.Generator, shard: np.ndarray, lengths: np.ndarray, batch_size: int
) -> list[np.ndarray]:
    """One shuffled epoch of ``shard`` as batches of similar lengths, in random order."""
    order, chunk = rng.permutation(shard), 32 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def predict(
    model: TextClassifier, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Predicted class ids; rows are batched by length so little compute goes to padding."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = np.argsort(lengths, kind="stable")
    out = np.zeros(len(ids), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = int(lengths[idx].max())
            x = torch.from_numpy(ids[idx, :width]).to(device)
            m = torch.from_numpy(_mask(lengths[idx], width)).to(device)
            out[idx] = model(x, m).argmax(-1).cpu().numpy()
    model.train(was_training)
    return out


def tfidf_baseline(
    train_texts: list[str], train_y: np.ndarray, eval_texts: list[str], eval_y: np.ndarray
) -> float:
    """Held-out accuracy of TF-IDF (sublinear word counts) + logistic regression on full texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(sublinear_tf=True)
    clf = LogisticRegression(C=10.0, max_iter=1000)
    clf.fit(vec.fit_transform(train_texts), train_y)
    return float((clf.predict(vec.transform(eval_texts)) == eval_y).mean())
