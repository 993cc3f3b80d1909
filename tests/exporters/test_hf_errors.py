"""Bad Hugging Face directories: one line naming the problem, exit 2, nothing in the repository."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from engine.cli import main
from tests.conftest import run_cli

pytest.importorskip("transformers", reason="pip install '.[hf]'")


def _export(capsys, path, repo) -> tuple[int, str]:
    code = main(["export", str(path), "--repo", str(repo), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


def _edit_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _copy(src, tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _drop_tensor(path, which: str, reshape: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    name = next(k for k in tensors if which in k)
    if reshape:
        tensors[name] = tensors[name][..., :-1].contiguous()
    else:
        del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


BROKEN = {  # what to break -> a phrase the one-line message must contain
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
    "tensor missing": (lambda p: _drop_tensor(p, "h.1.mlp.c_fc.bias"), "missing 1 tensor"),
    "wrong shape": (lambda p: _drop_tensor(p, "h.0.mlp.c_fc.weight", True), "wrong shape"),
    "no tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "vocab differs": (
        lambda p: _edit_config(p, vocab_size=999),
        "has 1000 tokens but config.json's vocab_size is 999",
    ),
    "unsupported arch": (
        lambda p: _edit_config(p, architectures=["LlamaForCausalLM"], model_type="llama"),
        "supported: BertForSequenceClassification (as bert-classifier), "
        "DistilBertForSequenceClassification (as bert-classifier), GPT2LMHeadModel",
    ),
    "inverse layer idx": (
        lambda p: _edit_config(p, scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx=True",
    ),
    "cross attention": (lambda p: _edit_config(p, add_cross_attention=True), "add_cross_attention"),
    "upcast": (lambda p: _edit_config(p, reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    "activation": (
        lambda p: _edit_config(p, activation_function="relu"),
        "activation_function='relu' (decoder-lm implements 'gelu_new')",
    ),
    "corrupt weights": (
        lambda p: (p / "model.safetensors").write_bytes(b"not a safetensors file"),
        "cannot be read",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_gpt2_directory_is_refused_in_one_line(case, hf_gpt2, tmp_path, capsys):
    path = _copy(hf_gpt2, tmp_path)
    breaker, phrase = BROKEN[case]
    breaker(path)
    code, err = _export(capsys, path, tmp_path / "repo")
    assert code == 2 and phrase in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "fixture, change, phrase",
    [
        ("hf_bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("hf_bert", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("hf_bert", {"problem_type": "multi_label_classification"}, "problem_type"),
        ("hf_distilbert", {"activation": "silu"}, "activation='silu'"),
        ("hf_distilbert", {"is_decoder": True}, "is_decoder=True"),
    ],
)
def test_a_bert_family_option_we_do_not_implement_is_named(
    fixture, change, phrase, request, tmp_path, capsys
):
    path = _copy(request.getfixturevalue(fixture), tmp_path)
    _edit_config(path, **change)
    code, err = _export(capsys, path, tmp_path / "repo")
    assert code == 2 and phrase in err and "does not implement" in err, err
    assert not (tmp_path / "repo").exists()


def test_a_bert_tokenizer_that_adds_no_cls_is_refused(hf_bert, tmp_path, capsys):
    path = _copy(hf_bert, tmp_path)
    raw = json.loads((path / "tokenizer.json").read_text())
    raw["post_processor"] = None  # [CLS] ... [SEP] would never be added
    (path / "tokenizer.json").write_text(json.dumps(raw))
    code, err = _export(capsys, path, tmp_path / "repo")
    assert code == 2 and "does not add [CLS]" in err, err


def test_a_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    code, err = _export(capsys, tmp_path / "model", tmp_path / "repo")
    assert code == 2 and "has no config.json" in err and "Hugging Face" in err, err


def test_without_transformers_validation_says_how_to_install_it(
    hf_gpt2, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    code, err = _export(capsys, hf_gpt2, tmp_path / "repo")
    assert code == 2 and "needs the 'hf' extra" in err and "pip install" in err, err
    assert "--no-validate" in err and not (tmp_path / "repo").exists()


def test_the_command_line_exits_2_with_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(
        json.dumps({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"})
    )
    res = run_cli("export", str(tmp_path / "model"), "--repo", str(tmp_path / "repo"))
    assert res.returncode == 2, res.stderr
    assert "T5ForConditionalGeneration' is not supported" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "repo").exists()
