"""Hugging Face ``BertForSequenceClassification`` and ``DistilBertForSequenceClassification``.

Both map onto ``bert-classifier``, whose parameter names are BERT's: BERT's tensors load as
they are, DistilBERT's are renamed by :data:`DISTILBERT_NAMES` (its ``pre_classifier`` + ReLU
is BERT's pooler with another activation; it has no segment embeddings). The tokenizer must
be the fast one (``tokenizer.json``) whose post-processor adds [CLS] ... [SEP]; label names
come from ``id2label`` and are served by name.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.hf_family import HFFamily, HFTokenizer

GELU = "gelu"  # the exact (erf) GELU the module implements
LABEL_PROBLEMS = (None, "single_label_classification")  # served as softmax over the labels
_LAYER = r"^distilbert\.transformer\.layer\.(\d+)\."
DISTILBERT_LAYER = {  # DistilBERT's names inside a layer -> bert-classifier's (BERT's)
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
DISTILBERT_NAMES = (  # (DistilBERT pattern, bert-classifier replacement), first match wins
    (r"^distilbert\.embeddings\.", "bert.embeddings."),
    *(
        (_LAYER + re.escape(a) + r"\.", rf"bert.encoder.layer.\1.{b}.")
        for a, b in DISTILBERT_LAYER.items()
    ),
    (r"^pre_classifier\.", "bert.pooler.dense."),
)
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # recomputed per call


class TokenizerAddsNoCLS(EngineError):
    """The tokenizer does not add [CLS] first, which the classifier reads its label from."""


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in table:
        new, hits = re.subn(pattern, replacement, name)
        if hits:
            return new
    return name


def _reverse(table: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The renaming the other way (bert-classifier -> DistilBERT) from the same table."""
    out = []
    for pattern, replacement in table:
        src = re.escape(replacement.replace(r"\1", "<n>")).replace("<n>", r"(\d+)")
        dst = pattern.removeprefix("^").replace(r"(\d+)", r"\1").replace("\\.", ".")
        out.append((f"^{src}", dst))
    return tuple(out)


def _labels(hf_config: dict[str, Any]) -> list[str]:
    id2label = hf_config.get("id2label") or {}
    n = int(hf_config.get("num_labels") or len(id2label) or 2)
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def _max_length(hf_config: dict[str, Any], tokenizer: HFTokenizer) -> int:
    positions = int(hf_config.get("max_position_embeddings", 512))
    configured = tokenizer.config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) when no length was set
    if isinstance(configured, int | float) and 0 < configured < 1_000_000:
        return min(int(configured), positions)
    return positions


class _BertLike(HFFamily):
    """What BERT and DistilBERT share: labels, tokenizer, max length, the checks on both."""

    architecture = "bert-classifier"
    auto_class = "AutoModelForSequenceClassification"
    layout: str
    act_key: str  # "hidden_act" or "activation"
    layers_key: str
    heads_key: str
    hidden_key: str

    def unsupported(self, hf_config: dict[str, Any]) -> list[str]:
        """Options that change the numerics or the served output, which the module lacks."""
        c, problems = hf_config, []
        act = c.get(self.act_key, GELU)
        if act != GELU:
            problems.append(f"{self.act_key}={act!r} (bert-classifier implements {GELU!r})")
        pos = c.get("position_embedding_type", "absolute")
        if pos != "absolute":
            problems.append(f"position_embedding_type={pos!r} (only 'absolute' is implemented)")
        for flag in ("is_decoder", "add_cross_attention"):
            if c.get(flag):
                problems.append(f"{flag}=True (an encoder classifier is implemented)")
        problem = c.get("problem_type")
        if problem not in LABEL_PROBLEMS or len(_labels(c)) < 2:
            problems.append(
                f"problem_type={problem!r} with {len(_labels(c))} label(s) (single-label "
                "classification over >= 2 labels is served)"
            )
        hidden, heads = int(c.get(self.hidden_key, 768)), int(c.get(self.heads_key, 12))
        if hidden % heads:
            problems.append(f"{self.hidden_key}={hidden} is not a multiple of {heads} heads")
        return problems

    def _check_tokenizer(self, tokenizer: HFTokenizer) -> tuple[int, int]:
        """The [CLS] and pad ids; the tokenizer must put [CLS] first itself."""
        cls_token = tokenizer.special("cls_token") or "[CLS]"
        cls_id = tokenizer.token_id(cls_token)
        first = tokenizer.tokenizer.encode("a").ids[:1]
        if cls_id is None or first != [cls_id]:
            raise TokenizerAddsNoCLS(
                f"{tokenizer.path} does not add {cls_token} at the start of a text (no "
                "post-processor): re-save it with tokenizer.save_pretrained"
            )
        pad_id = tokenizer.token_id(tokenizer.special("pad_token") or "[PAD]")
        return cls_id, 0 if pad_id is None else pad_id

    def write_artifacts(
        self, hf_config: dict[str, Any], tokenizer: HFTokenizer, out_dir: Path
    ) -> None:
        """``tokenizer.json`` as it is and ``labels.json`` from ``id2label``, in logit order."""
        from plugins.bert_classifier.data import LABELS_FILE, TOKENIZER_FILE

        shutil.copyfile(tokenizer.path, Path(out_dir) / TOKENIZER_FILE)
        (Path(out_dir) / LABELS_FILE).write_text(json.dumps(_labels(hf_config)))

    def converts(self, config: Any) -> bool:
        """The family whose layout the config records."""
        return config.layout == self.layout

    def _labels_to_hf(self, artifacts_dir: Path) -> dict[str, Any]:
        from plugins.bert_classifier.data import LABELS_FILE

        labels = json.loads((Path(artifacts_dir) / LABELS_FILE).read_text())
        return {
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "single_label_classification",
        }

    def tokenizer_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """BERT's special tokens where the tokenizer has them; its truncation length."""
        from tokenizers import Tokenizer

        from plugins.bert_classifier.data import TOKENIZER_FILE

        tokenizer = Tokenizer.from_file(str(Path(artifacts_dir) / TOKENIZER_FILE))
        roles = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
        special = {
            f"{r}_token": t for r, t in roles.items() if tokenizer.token_to_id(t) is not None
        }
        return {**special, "model_max_length": config.max_length}


class BertFamily(_BertLike):
    """``BertForSequenceClassification`` onto ``bert-classifier`` (and back)."""

    hf_architecture = "BertForSequenceClassification"
    model_type = "bert"
    layout = "bert"
    act_key, layers_key, heads_key, hidden_key = (
        "hidden_act",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_size",
    )

    def config_from_hf(self, hf_config: dict[str, Any], tokenizer: HFTokenizer) -> Any:
        """BERT's shape, labels and dropout; max length from the tokenizer's config."""
        from plugins.bert_classifier.arch import BertClassifierConfig

        c = hf_config
        _, pad_id = self._check_tokenizer(tokenizer)
        return BertClassifierConfig(
            layout=self.layout,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c.get("hidden_size", 768)),
            num_layers=int(c.get("num_hidden_layers", 12)),
            num_heads=int(c.get("num_attention_heads", 12)),
            intermediate_size=int(c.get("intermediate_size", 3072)),
            max_position_embeddings=int(c.get("max_position_embeddings", 512)),
            type_vocab_size=int(c.get("type_vocab_size", 2)),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
            pooler_activation="tanh",
            num_labels=len(_labels(c)),
            pad_token_id=int(c["pad_token_id"]) if c.get("pad_token_id") is not None else pad_id,
            max_length=_max_length(c, tokenizer),
            dropout=float(c.get("hidden_dropout_prob", 0.1)),
        )

    def weights_from_hf(self, tensors: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """BERT's names are the module's; old ``gamma``/``beta`` LayerNorm names renamed."""
        out = {}
        for name, t in tensors.items():
            if name.endswith(BUFFERS):
                continue
            name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
            out[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)] = t
        return out

    def config_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """``BertConfig`` fields for the classifier's shape and labels."""
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "intermediate_size": config.intermediate_size,
            "hidden_act": GELU,
            "hidden_dropout_prob": config.dropout,
            "attention_probs_dropout_prob": config.dropout,
            "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size,
            "layer_norm_eps": config.layer_norm_eps,
            "pad_token_id": config.pad_token_id,
            **self._labels_to_hf(artifacts_dir),
        }

    def weights_to_hf(self, state_dict: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """The same names."""
        return dict(state_dict)


class DistilBertFamily(_BertLike):
    """``DistilBertForSequenceClassification`` onto ``bert-classifier`` (and back)."""

    hf_architecture = "DistilBertForSequenceClassification"
    model_type = "distilbert"
    layout = "distilbert"
    act_key, layers_key, heads_key, hidden_key = ("activation", "n_layers", "n_heads", "dim")

    def config_from_hf(self, hf_config: dict[str, Any], tokenizer: HFTokenizer) -> Any:
        """DistilBERT's shape: no segments, LayerNorm eps fixed at 1e-12, a ReLU head."""
        from plugins.bert_classifier.arch import BertClassifierConfig

        c = hf_config
        _, pad_id = self._check_tokenizer(tokenizer)
        return BertClassifierConfig(
            layout=self.layout,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c.get("dim", 768)),
            num_layers=int(c.get("n_layers", 6)),
            num_heads=int(c.get("n_heads", 12)),
            intermediate_size=int(c.get("hidden_dim", 3072)),
            max_position_embeddings=int(c.get("max_position_embeddings", 512)),
            type_vocab_size=0,
            layer_norm_eps=1e-12,  # hard-coded in DistilBERT
            pooler_activation="relu",
            num_labels=len(_labels(c)),
            pad_token_id=int(c["pad_token_id"]) if c.get("pad_token_id") is not None else pad_id,
            max_length=_max_length(c, tokenizer),
            dropout=float(c.get("dropout", 0.1)),
        )

    def weights_from_hf(self, tensors: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """DistilBERT's names renamed onto BERT's; the position-id buffer dropped."""
        return {
            _rename(name, DISTILBERT_NAMES): t
            for name, t in tensors.items()
            if not name.endswith(BUFFERS)
        }

    def config_to_hf(self, config: Any, artifacts_dir: Path) -> dict[str, Any]:
        """``DistilBertConfig`` fields; a config with segment embeddings does not fit it."""
        from engine.hf_family import HFConvertUnsupported

        if config.type_vocab_size or config.pooler_activation != "relu":
            raise HFConvertUnsupported("DistilBERT has no segment embeddings and a ReLU head")
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "dim": config.hidden_size,
            "n_layers": config.num_layers,
            "n_heads": config.num_heads,
            "hidden_dim": config.intermediate_size,
            "activation": GELU,
            "dropout": config.dropout,
            "attention_dropout": config.dropout,
            "seq_classif_dropout": config.dropout,
            "max_position_embeddings": config.max_position_embeddings,
            "sinusoidal_pos_embds": False,
            "pad_token_id": config.pad_token_id,
            **self._labels_to_hf(artifacts_dir),
        }

    def weights_to_hf(self, state_dict: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """bert-classifier's names renamed back onto DistilBERT's."""
        table = _reverse(DISTILBERT_NAMES)
        return {_rename(name, table): t for name, t in state_dict.items()}
