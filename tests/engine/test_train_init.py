"""``engine train ARCH --init SOURCE``: training starts from pretrained weights, exactly.

The loss the trainer logs at step 0 is the loss transformers computes for the same batch with
the model in the Hugging Face directory (dropout off in both), so the weights, the tokenizer
and the objective all carried over.
"""

from __future__ import annotations

import json

import pytest

from engine import checkpoint
from engine.configs import make_config
from engine.paths import cache_dir
from engine.trainer import train
from exporters.source import open_source
from tests.runtime import conftest as runtime

lm_checkpoint = runtime.lm_checkpoint  # the runtime tests' tiny trained decoder (session)

transformers = pytest.importorskip("transformers", reason="pip install '.[hf]'")
torch = pytest.importorskip("torch")
F = torch.nn.functional


def _first_batch(ckpt, source):
    """Rebuild the run's first batch: same config, same data, same seed, rank 0."""
    meta = checkpoint.read_meta(ckpt)
    arch = source.arch
    config = make_config(arch.config_class, meta.config)
    data = arch.load_data(config, cache_dir(), source.artifacts_dir)
    return next(arch.train_batches(data, config, meta.seed, 0, 1))


def test_decoder_lm_from_gpt2_starts_at_transformers_loss(hf_gpt2, tmp_path):
    overrides = {"batch_size": 4, "eval_windows": 4}
    with open_source(hf_gpt2) as source:
        ckpt = train(
            "decoder-lm", tmp_path / "ckpt", steps=1, overrides=overrides, progress=False,
            init=source,
        )  # fmt: skip
        batch = _first_batch(ckpt, source)
    loss = json.loads((ckpt / "metrics.json").read_text())["train"]["final_loss"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2).eval()
    with torch.no_grad():  # GPT-2's objective: token t predicts token t + 1
        logits = hf(input_ids=batch[:, :-1]).logits
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert loss == pytest.approx(float(want), abs=1e-4)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["architecture"] == "decoder-lm" and meta["init"]["source"] == "huggingface"
    assert meta["init"]["fresh_tensors"] == [] and meta["config"]["block_size"] == 128
    saved, theirs = (json.loads((d / "tokenizer.json").read_text()) for d in (ckpt, hf_gpt2))
    assert saved == theirs  # the run kept the model's own tokenizer


def test_decoder_lm_continues_from_its_own_checkpoint(lm_checkpoint, tmp_path):
    before = checkpoint.load(lm_checkpoint)[2].state_dict()
    with open_source(lm_checkpoint) as source:
        ckpt = train(
            "decoder-lm", tmp_path / "more", steps=1, overrides={"eval_windows": 4},
            progress=False, init=source,
        )  # fmt: skip
        batch = _first_batch(ckpt, source)
    loss = json.loads((ckpt / "metrics.json").read_text())["train"]["final_loss"]
    _, _, model = checkpoint.load(lm_checkpoint)
    with torch.no_grad():
        logits, _ = model(batch[:, :-1])
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert loss == pytest.approx(float(want), abs=1e-5)
    after = checkpoint.load(ckpt)[2].state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)  # it trained a step


def test_text_classifier_fine_tunes_a_bert_from_transformers_loss(tmp_path):
    from plugins.bert_classifier.data import task_labels
    from tests.hf_models import save_bert

    labels = tuple(task_labels(3, 10, None))  # the text-classifier task's ten packages
    hf_dir = save_bert(
        tmp_path / "bert", "bert", labels=labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=128,
    )  # fmt: skip
    with open_source(hf_dir) as source:
        ckpt = train(
            "text-classifier", tmp_path / "ckpt", steps=1, overrides={"batch_size": 8},
            progress=False, init=source,
        )  # fmt: skip
        batch = _first_batch(ckpt, source)
    loss = json.loads((ckpt / "metrics.json").read_text())["train"]["final_loss"]
    hf = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = hf(**batch).loss
    assert loss == pytest.approx(float(want), abs=1e-5)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["architecture"] == "bert-classifier" and meta["init"]["fresh_tensors"] == []
    assert json.loads((ckpt / "labels.json").read_text()) == list(labels)


def test_a_head_for_other_labels_starts_fresh_and_an_unrelated_arch_is_refused(hf_bert, tmp_path):
    from engine.errors import EngineError

    with open_source(hf_bert) as source:
        with pytest.raises(EngineError, match="train it as bert-classifier or text-classifier"):
            train("decoder-lm", tmp_path / "x", steps=1, progress=False, init=source)
        ckpt = train(
            "bert-classifier", tmp_path / "ckpt", steps=1, progress=False, init=source,
            overrides={"num_labels": 10, "batch_size": 8},
        )  # fmt: skip
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["init"]["fresh_tensors"] == ["classifier.bias", "classifier.weight"]
