"""Read a Hugging Face model directory (what ``save_pretrained`` writes) into a ModelSource.

``config.json`` -> the family registered for its ``architectures`` -> the options that family
cannot reproduce -> ``tokenizer.json`` (and ``tokenizer_config.json``), whose vocabulary must be
the model's -> the weights (``model.safetensors``, shards listed in
``model.safetensors.index.json``, ``pytorch_model.bin`` or its shards) renamed by the family and
checked name by name and shape by shape against the architecture's module. Each failure is one
:class:`HFImportError` naming the problem, raised before anything is written anywhere.
Reading needs torch, safetensors and tokenizers only; transformers is needed to validate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.hf_family import HFFamily, HFTokenizer
from exporters.source import ModelSource

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class HFImportError(EngineError):
    """A Hugging Face directory cannot be imported (base of the failures below)."""


class UnsupportedArchitecture(HFImportError):
    """No plugin maps the directory's ``architectures`` onto an engine architecture."""


class UnsupportedOption(HFImportError):
    """The config sets an option the mapped architecture does not reproduce."""


class WeightsError(HFImportError):
    """Weights are missing, unreadable, or do not fit the config (names or shapes)."""


class TokenizerError(HFImportError):
    """``tokenizer.json`` is missing, unreadable, or its vocabulary is not the model's."""


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face directory as a dict."""
    try:
        raw = json.loads((Path(path) / CONFIG).read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path} has no {CONFIG}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFImportError(f"{Path(path) / CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise HFImportError(f"{Path(path) / CONFIG} is not a JSON object")
    return raw


def find_family(hf_config: dict[str, Any], where: Path) -> tuple[HFFamily, Any]:
    """The family (and its plugin) registered for ``architectures[0]``; else list the known."""
    from engine.plugins import hf_families

    known = hf_families()
    names = hf_config.get("architectures") or []
    name = names[0] if isinstance(names, list) and names else None
    if name not in known:
        what = f"architecture {name!r}" if name else f"model_type {hf_config.get('model_type')!r}"
        raise UnsupportedArchitecture(
            f"{where / CONFIG}: {what} is not supported; supported: "
            + ", ".join(f"{k} (as {f.architecture})" for k, (f, _) in known.items())
        )
    family, info = known[name]
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type != family.model_type:
        raise UnsupportedArchitecture(
            f"{where / CONFIG}: architecture {name} with model_type {model_type!r}; "
            f"{info.name} maps {name} of model_type {family.model_type!r} only"
        )
    return family, info


def load_tokenizer(path: Path, vocab_size: int) -> HFTokenizer:
    """``tokenizer.json`` (and ``tokenizer_config.json``); its vocabulary must be ``vocab_size``."""
    from tokenizers import Tokenizer

    file = Path(path) / TOKENIZER
    if not file.is_file():
        raise TokenizerError(
            f"{path} has no {TOKENIZER} (a fast tokenizer, as tokenizer.save_pretrained writes "
            "it); vocab.txt / merges.txt alone are not read"
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust library raises its own exception type
        raise TokenizerError(f"{file} cannot be read: {exc}") from None
    config: dict[str, Any] = {}
    if (Path(path) / TOKENIZER_CONFIG).is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
            loaded = json.loads((Path(path) / TOKENIZER_CONFIG).read_text())
            config = loaded if isinstance(loaded, dict) else {}
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:
        raise TokenizerError(
            f"{file} has {size} tokens but config.json's vocab_size is {vocab_size}: the "
            "tokenizer does not belong to this model"
        )
    return HFTokenizer(file, tokenizer, config)


def weight_files(path: Path) -> list[Path]:
    """The files holding the weights, in the order Hugging Face prefers (safetensors first)."""
    path = Path(path)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{path / index} is not a shard index: {e}") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise WeightsError(f"{path / index} lists shards that are missing: {missing}")
            return [path / s for s in shards]
    raise WeightsError(
        f"{path} has no weights: none of {SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN}, "
        f"{PYTORCH_BIN_INDEX}"
    )


def load_tensors(files: list[Path]) -> dict[str, Any]:
    """Every tensor of the weight files on the CPU (``.bin`` with ``weights_only``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                part = load_file(str(file), device="cpu")
            else:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
            raise WeightsError(f"{file} cannot be read: {exc}") from None
        if not isinstance(part, dict):
            raise WeightsError(f"{file} holds no state dict")
        tensors.update(part)
    return tensors


def load_weights(model: Any, tensors: dict[str, Any], where: str, arch_name: str) -> None:
    """Load mapped ``tensors`` into ``model``, naming missing, unexpected and mis-shaped ones."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) the config needs: {missing[:4]}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} tensor(s) {arch_name} has no place for: {unexpected[:4]}"
            )
        raise WeightsError(f"{where}: " + "; ".join(parts))
    wrong = [
        f"{k} is {tuple(t.shape)}, config.json needs {tuple(expected[k].shape)}"
        for k, t in tensors.items()
        if tuple(t.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise WeightsError(
            f"{where}: {len(wrong)} tensor(s) of the wrong shape: {wrong[0]}"
            + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else "")
        )
    model.load_state_dict(tensors, strict=True)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def open_hf(path: Path) -> Iterator[ModelSource]:
    """Import a Hugging Face directory as a source; its artifacts live in a temporary dir."""
    from engine.configs import config_to_dict
    from engine.plugins import get_architecture
    from exporters.hf.reference import TransformersReference

    path = Path(path)
    hf_config = read_config(path)
    family, family_plugin = find_family(hf_config, path)
    problems = family.unsupported(hf_config)
    if problems:
        raise UnsupportedOption(
            f"{path / CONFIG} ({family.hf_architecture}) sets options {family.architecture} does "
            "not implement: " + "; ".join(problems)
        )
    if not isinstance(hf_config.get("vocab_size"), int):
        raise HFImportError(f"{path / CONFIG} has no integer vocab_size")
    tokenizer = load_tokenizer(path, int(hf_config["vocab_size"]))
    arch, arch_plugin = get_architecture(family.architecture)
    config = family.config_from_hf(hf_config, tokenizer)
    files = weight_files(path)
    tensors = family.weights_from_hf(load_tensors(files), config)
    model = arch.build_model(config)
    where = str(files[0] if len(files) == 1 else path / "(shards)")
    load_weights(model, tensors, where, arch.name)
    del tensors
    model.eval()
    provenance = {
        "source": "huggingface",
        "path": str(path.resolve()),
        "hf_architecture": family.hf_architecture,
        "model_type": hf_config.get("model_type"),
        "transformers_version": hf_config.get("transformers_version"),
        "family": {"plugin": family_plugin.name, "version": family_plugin.version},
        "files": {f.name: sha256(f) for f in (*files, tokenizer.path)},
        "hf_config": hf_config,
        "config": config_to_dict(config),
    }
    plugin = {
        "name": arch_plugin.name,
        "version": arch_plugin.version,
        "source": arch_plugin.source,
    }
    name = path.resolve().name
    name = name if _NAME_RE.match(name) else arch.name
    with tempfile.TemporaryDirectory(prefix="engine-hf-import-") as tmp:
        family.write_artifacts(hf_config, tokenizer, Path(tmp))
        reference = TransformersReference(path, family, hf_config)
        yield ModelSource(arch, config, model, Path(tmp), plugin, provenance, name, reference)
