"""``engine convert CHECKPOINT --to hf OUT_DIR``: an engine checkpoint as a Hugging Face directory.

The family registered for the checkpoint's architecture (``engine_register_hf_families``)
renames the weights and writes the config; transformers itself builds the model class, loads
them and saves the directory, and ``PreTrainedTokenizerFast`` saves the tokenizer, so the
result is what the installed transformers writes and reads. Before the directory is moved into
place it is loaded back with ``AutoModelFor...`` and ``AutoTokenizer`` and must reproduce the
checkpoint: the same token ids, the same greedy tokens (language models) or logits within 1e-4
and the same labels (classifiers). It is written into a temporary sibling and renamed, so a
failure leaves nothing at ``OUT_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.hf_family import HFConvertUnsupported, HFFamily
from exporters.hf.reference import PROMPTS, require_transformers, texts_64

GREEDY_TOKENS = 32
LOGITS_ATOL = 1e-4


class ConvertError(EngineError):
    """The converted directory does not reproduce the checkpoint (or cannot be written)."""


def family_for(arch: Any, config: Any) -> HFFamily:
    """The family that converts ``arch`` with this config; else list what converts to what."""
    from engine.plugins import hf_families

    families = [f for f, _ in hf_families().values()]
    for family in families:
        if family.architecture == arch.name and family.converts(config):
            return family
    supported = ", ".join(f"{f.architecture} -> {f.hf_architecture}" for f in families)
    raise HFConvertUnsupported(
        f"{arch.name} maps onto no transformers class (no Hugging Face family converts it); "
        f"supported: {supported}"
    )


def convert_to_hf(ckpt_dir: Path, out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Write ``ckpt_dir`` as a Hugging Face directory at ``out_dir``; return what was checked."""
    from engine.atomic import staged_dir
    from exporters.source import checkpoint_source, source_kind

    transformers = require_transformers("engine convert --to hf")
    if source_kind(ckpt_dir) != "checkpoint":
        raise ConvertError(f"{ckpt_dir} is already a Hugging Face directory")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ConvertError(f"{out_dir} exists; pass --force to replace it")
    source = checkpoint_source(Path(ckpt_dir))
    family = family_for(source.arch, source.config)
    hf_config = family.config_to_hf(source.config, source.artifacts_dir)
    weights = family.weights_to_hf(source.model.state_dict(), source.config)
    with staged_dir(out_dir, replace=force) as tmp:
        config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        model = getattr(transformers, family.hf_architecture)(config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConvertError(
                f"{family.hf_architecture} does not take the mapped weights: missing "
                f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
            )
        model.save_pretrained(tmp)
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(source.artifacts_dir / "tokenizer.json"),
            **family.tokenizer_to_hf(source.config, source.artifacts_dir),
        )
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        report = _reload_matches(tmp, source, family)
    return {"path": str(out_dir), "class": family.hf_architecture, **report}


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class every transformers release knows (``PreTrainedTokenizerFast``).

    transformers 5 writes ``TokenizersBackend`` (and a ``backend`` key), which 4.x cannot
    resolve; ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both.
    """
    import json

    config = json.loads(path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


def _reload_matches(hf_dir: Path, source: Any, family: HFFamily) -> dict[str, Any]:
    """Load ``hf_dir`` the way a user would and compare it with the checkpoint's own model."""
    import torch
    import transformers

    auto = getattr(transformers, family.auto_class)
    theirs = auto.from_pretrained(str(hf_dir)).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    with torch.no_grad():
        if source.arch.task == "generate":
            return _same_greedy(theirs, tokenizer, source)
        return _same_logits(theirs, tokenizer, source)


def _same_greedy(theirs: Any, hf_tokenizer: Any, source: Any) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from engine.graph_decoder import GraphDecoder, torch_runner

    arch, config, model = source.arch, source.config, source.model
    serving = arch.serving_metadata(config, source.artifacts_dir)
    ours = Tokenizer.from_file(str(source.artifacts_dir / serving["tokenizer"]))
    prompts = [ours.encode(p).ids for p in PROMPTS]
    if [hf_tokenizer(p)["input_ids"] for p in PROMPTS] != prompts:
        raise ConvertError("AutoTokenizer on the converted directory gives other token ids")
    signature = arch.export_signature(config, "default")
    example = arch.example_inputs(config, 1, 1, 0, seed=0, variant="default")
    decoder = GraphDecoder(signature, {k: v.shape for k, v in example.items()})
    run = torch_runner(arch.export_module(model, config, "default").eval(), signature)
    pad = int(serving.get("pad_token_id") or 0)
    for i, prompt in enumerate(prompts):
        want = decoder.generate(run, [prompt], GREEDY_TOKENS, pad)[0].tolist()
        x = torch.tensor([prompt])
        out = theirs.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
        )
        if out[0, len(prompt) :].tolist() != want:
            raise ConvertError(
                f"transformers' greedy tokens differ for prompt {i} ({PROMPTS[i]!r})"
            )
    return {"prompts": len(prompts), "greedy_tokens": GREEDY_TOKENS, "identical": True}


def _same_logits(theirs: Any, hf_tokenizer: Any, source: Any) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from engine.runtime.batched_engines import TYPE_IDS, encode_texts, prepare_tokenizer

    arch, config, model = source.arch, source.config, source.model
    serving = arch.serving_metadata(config, source.artifacts_dir)
    ours = Tokenizer.from_file(str(source.artifacts_dir / serving["tokenizer"]))
    max_length, pad = int(serving["max_length"]), int(serving["pad_token_id"])
    prepare_tokenizer(ours, max_length, serving.get("cls_token_id"))
    texts = texts_64()
    feeds = encode_texts(ours, texts, pad, serving.get("cls_token_id"))
    want = hf_tokenizer(texts, truncation=True, max_length=max_length, padding=True)
    if not np.array_equal(np.asarray(want["input_ids"]), feeds["input_ids"]):
        raise ConvertError("AutoTokenizer on the converted directory gives other token ids")
    x = {k: torch.from_numpy(v) for k, v in feeds.items() if k != TYPE_IDS}
    mine = model(x["input_ids"], x["attention_mask"]).double()
    got = theirs(**x).logits.double()
    diff = float((mine - got).abs().max())
    if diff > LOGITS_ATOL or not torch.equal(mine.argmax(-1), got.argmax(-1)):
        raise ConvertError(f"transformers' logits differ from the checkpoint's by {diff:.3g}")
    return {"texts": len(texts), "max_abs_logit_diff": diff, "identical_labels": True}
