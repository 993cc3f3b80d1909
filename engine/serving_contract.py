"""The serving contract: what a model version must hold for the runtime to serve its task.

Checked by the exporters before a version is written (an export the server could not load is
refused with the missing key) and by the server before it loads one (an older or hand-made
version fails with one line instead of a KeyError). docs/plugins.md shows the same table.

generate        serving: context_length, vocab_size (int); optional eos_token_id, pad_token_id,
                tokenizer (file, default tokenizer.json). Graph ``kv_inplace`` with inputs
                input_ids, position_ids, causal_mask, block_table, block_mask, block_rows,
                block_slots, block_weights and the cache pools (the paged KV cache; a graph
                with a cache_mask input predates it, one with block_owner computes its masks
                itself: both must be re-exported).
classify, text  serving: labels (list of str), tokenizer (file), max_length, pad_token_id (int);
                optional cls_token_id. Main graph inputs input_ids and attention_mask
                (int64, (batch, sequence)), first output the logits (batch, len(labels)).
classify,       serving: labels, and ``input`` naming the main graph's only input (any dtype,
  tensor        batch first, e.g. pixels (batch, 1, 8, 8)); first output the logits.
sample_images   serving: latent_dim, num_classes (int), image_shape (3 ints: C, H, W); optional
                pixel_range. Main graph inputs z (float32, (batch, latent_dim)) and labels
                (int64, (batch,)), first output the images (batch, C, H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.paged_inputs import OLD_PAGED_INPUTS, PAGED_INPUTS
from engine.repository import Manifest, RepositoryError

TASKS = ("generate", "classify", "sample_images")
# the paged kv_inplace graph's inputs besides the cache pools (engine/paged_inputs.py)
KV_INPUTS = ("input_ids", "position_ids", *PAGED_INPUTS)


def outdated_kv_graph(input_names) -> str | None:
    """Why a ``kv_inplace`` graph with these inputs predates this runtime (it must be
    re-exported), or None: the runner and the server's load check say the same."""
    names = set(input_names)
    if "cache_mask" in names and "block_table" not in names:
        why = "reads one contiguous cache row per sequence, from before the paged KV cache"
    elif names.issuperset(OLD_PAGED_INPUTS):
        why = (
            "computes its masks and block rows itself (inputs new_mask, cache_lens,"
            " block_owner, block_index), from before the runtime gave them as inputs"
        )
    else:
        return None
    return f"its kv_inplace graph {why}; re-export it (engine export CHECKPOINT --repo REPO)"


DOCS = "docs/plugins.md#the-serving-contract"


class ServingContractError(RepositoryError):
    """A model version lacks what the runtime needs to serve its task."""


def _need(serving: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in serving:
        raise ServingContractError(f"{what} needs serving key {key!r} ({kind.__name__})")
    value = serving[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ServingContractError(
            f"{what} needs serving key {key!r} to be {kind.__name__}, got {value!r}"
        )
    return value


def _graph_inputs(manifest: Manifest, variant: str | None, what: str) -> list[str]:
    if manifest.format == "torch" or not manifest.graphs:
        return []  # no graph: the torch runtime builds the module from the weights
    variant = variant or manifest.main_graph or next(iter(manifest.graphs))
    if variant not in manifest.graphs:
        raise ServingContractError(f"{what} needs a {variant!r} graph")
    return [t["name"] for t in manifest.graphs[variant].get("inputs", [])]


def _need_inputs(found: list[str], wanted: tuple[str, ...], what: str, graph: str) -> None:
    missing = [n for n in wanted if n not in found] if found else []
    if missing:
        raise ServingContractError(
            f"{what} needs {graph} graph inputs {', '.join(wanted)}; it has {', '.join(found)}"
        )


def classify_input(serving: dict[str, Any]) -> str:
    """``text`` for a tokenizer-based classifier, else the name of its tensor input."""
    return "text" if "tokenizer" in serving or "input" not in serving else str(serving["input"])


def check_serving(manifest: Manifest, where: str, root: Path | None = None) -> None:
    """Raise :class:`ServingContractError` if ``manifest`` (files under ``root``) cannot serve."""
    task = manifest.task
    what = f"{where}: task {task!r}"
    serving = manifest.serving if isinstance(manifest.serving, dict) else {}
    if task not in TASKS:
        raise ServingContractError(f"{where} has task {task!r}; the runtime serves {TASKS}")
    files = []
    if task == "generate":
        _need(serving, "context_length", int, what)
        _need(serving, "vocab_size", int, what)
        files.append(serving.get("tokenizer", "tokenizer.json"))
        inputs = _graph_inputs(manifest, "kv_inplace", what)
        outdated = outdated_kv_graph(inputs)
        if outdated:
            raise ServingContractError(f"{what}: {outdated}")
        _need_inputs(inputs, KV_INPUTS, what, "kv")
    elif task == "classify":
        labels = _need(serving, "labels", list, what)
        if not labels or not all(isinstance(x, str) for x in labels):
            raise ServingContractError(f"{what} needs serving key 'labels' to list label names")
        inputs = _graph_inputs(manifest, None, what)
        if classify_input(serving) == "text":
            files.append(_need(serving, "tokenizer", str, what + " (text input)"))
            _need(serving, "max_length", int, what + " (text input)")
            _need(serving, "pad_token_id", int, what + " (text input)")
            _need_inputs(inputs, ("input_ids", "attention_mask"), what, "the main")
        else:
            name = _need(serving, "input", str, what)
            if inputs and inputs != [name]:
                raise ServingContractError(
                    f"{what} names input {name!r}, but the main graph takes {', '.join(inputs)}"
                    " (a tensor classifier takes exactly one input)"
                )
    else:
        _need(serving, "latent_dim", int, what)
        _need(serving, "num_classes", int, what)
        shape = _need(serving, "image_shape", list, what)
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ServingContractError(f"{what} needs 'image_shape' as [C, H, W], got {shape!r}")
        _need_inputs(_graph_inputs(manifest, None, what), ("z", "labels"), what, "the main")
    if root is not None:
        for file in files:
            if not (Path(root) / file).is_file():
                raise ServingContractError(f"{what} needs the file {file!r}, which is missing")
