"""``engine convert CHECKPOINT --to hf OUT_DIR``: transformers loads what it writes and agrees."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.cli import main
from exporters.source import open_source
from tests.runtime import conftest as runtime

transformers = pytest.importorskip("transformers", reason="pip install '.[hf]'")
torch = pytest.importorskip("torch")
lm_checkpoint = runtime.lm_checkpoint  # the runtime tests' tiny trained decoder (session)


def _write_checkpoint(arch, config, model, out, artifacts=()) -> None:
    """A checkpoint directory as `engine train` writes one (weights, config.json, artifacts)."""
    from safetensors.torch import save_model

    from engine.configs import config_to_dict

    out.mkdir(parents=True)
    save_model(model, str(out / "model.safetensors"))
    meta = {"architecture": arch.name, "config": config_to_dict(config), "step": 0, "seed": 0}
    (out / "config.json").write_text(json.dumps(meta))
    for path in artifacts:
        shutil.copy(path, out / path.name)


def test_a_decoder_checkpoint_loads_in_transformers_with_the_same_greedy_tokens(
    lm_checkpoint, tmp_path, capsys
):
    from engine import checkpoint
    from plugins.decoder_lm.data import load_tokenizer

    out = tmp_path / "hf"
    assert main(["convert", str(lm_checkpoint), "--to", "hf", str(out)]) == 0
    assert "greedy tokens identical on 12 prompts" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(lm_checkpoint / "tokenizer.json")
    _, _, gpt = checkpoint.load(lm_checkpoint)
    text = "def read_config(path):\n    "
    ids = tokenizer(text)["input_ids"]
    assert ids == ours.encode(text).ids and tokenizer.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                                do_sample=False, eos_token_id=None, pad_token_id=1)  # fmt: skip
        mine, logits = list(ids), gpt(x)[0]
        for _ in range(16):
            mine.append(int(logits[0, -1].argmax()))
            logits = gpt(torch.tensor([mine]))[0]
    assert theirs[0].tolist() == mine
    # it exists now: refused without --force, replaced with it
    assert main(["convert", str(lm_checkpoint), "--to", "hf", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["convert", str(lm_checkpoint), "--to", "hf", str(out), "--force"]) == 0


@pytest.mark.parametrize("fixture", ["hf_bert", "hf_distilbert"])
def test_a_bert_family_round_trip_gives_transformers_the_same_logits(
    fixture, request, tmp_path, capsys
):
    from exporters.hf.reference import texts_64

    hf_dir = request.getfixturevalue(fixture)
    with open_source(hf_dir) as source:  # Hugging Face -> an engine checkpoint -> Hugging Face
        files = [source.artifacts_dir / n for n in ("tokenizer.json", "labels.json")]
        _write_checkpoint(source.arch, source.config, source.model, tmp_path / "ckpt", files)
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "labels identical" in capsys.readouterr().out
    before = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    after = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(after) is type(before) and after.config.id2label == before.config.id2label
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    original = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = texts_64()
    batch = tokenizer(texts, truncation=True, padding=True, return_tensors="pt")
    want = original(texts, truncation=True, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], want["input_ids"])
    inputs = {k: v for k, v in batch.items() if k != "token_type_ids" or fixture == "hf_bert"}
    with torch.no_grad():
        diff = (after.eval()(**inputs).logits - before(**inputs).logits).abs().max()
    assert float(diff) < 1e-5


def test_an_architecture_without_a_transformers_class_is_refused_and_nothing_written(
    tmp_path, capsys
):
    from engine.plugins import get_architecture

    arch, _ = get_architecture("text-classifier")
    config = arch.config_class(n_layer=1, d_model=32, n_head=2)
    _write_checkpoint(arch, config, arch.build_model(config), tmp_path / "ckpt")
    code = main(["convert", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code == 2 and "text-classifier maps onto no transformers class" in err, err
    assert "decoder-lm -> GPT2LMHeadModel" in err and "bert-classifier -> " in err
    assert not (tmp_path / "hf").exists() and len(err.strip().splitlines()) == 1
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "onnx", str(tmp_path / "x")]) == 2
