"""Decoding through a ``generate`` graph with its KV cache, on any runner: the one loop.

Export validation (ONNX against PyTorch), the bench's bare onnxruntime loop and the decoder
plugin's ``engine sample`` all decode with :class:`GraphDecoder`: greedy by default, or any
``pick`` of the next token from the logits. A runner is a function of named numpy arrays to
named numpy arrays: :func:`ort_runner` for an onnxruntime session, :func:`torch_runner` for an
export wrapper module (torch is imported only there).

The roles of a generate graph's tensors come from its ExportSignature by name, the convention
the decoder plugins and the runtime share:

* ``input_ids`` and ``position_ids`` (batch, sequence): the new tokens and their positions;
* ``attention_mask`` (batch, cache + sequence): 1 for cache slots and new tokens to attend to,
  or ``cache_mask`` (batch, cache) and ``new_mask`` (batch, sequence) given separately;
* KV inputs: every other input of rank >= 3, paired with the output whose name has the same
  suffix after the first dot (``past_key_values.0.key`` <-> ``present.0.key``,
  ``cache.0.key`` <-> ``new.0.key``), sequence on the first dynamic axis after batch.

If a KV output's sequence axis has the input tokens' axis name, the graph returns only the new
tokens' keys/values and the caller writes them into a preallocated buffer (``kv_inplace``);
otherwise the output is the whole cache and is fed back as the next step's input.

A *paged* graph (it has a ``block_table`` input, the runtime's ``kv_inplace``) reads its KV
inputs as pools of blocks ``(pool_blocks, heads, block_size, head_dim)`` and takes the block
tables, masks and per-block roles of engine/paged_inputs.py instead of a cache mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.architecture import ExportSignature, TensorSpec
from engine.errors import EngineError
from engine.paged_inputs import PAGED_INPUTS, paged_inputs

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Pick = Callable[[np.ndarray, int], np.ndarray]  # (last logits (B, V), step) -> token ids (B,)
MASK_ROLES = ("attention_mask", "cache_mask", "new_mask")


class UnknownGraphLayout(EngineError):
    """A generate graph's inputs do not follow the naming convention above, so it cannot run."""


def greedy_pick(logits: np.ndarray, step: int) -> np.ndarray:
    """The most likely token of each row."""
    return np.argmax(logits, axis=-1)


def ort_runner(session: Any) -> Runner:
    """Run an onnxruntime session on a dict of numpy inputs; return every output by name."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))

    return run


def torch_runner(module: Any, signature: ExportSignature) -> Runner:
    """Run an export wrapper positionally in signature order; return numpy by name."""
    import torch

    device = next(iter(module.parameters()), torch.empty(0)).device

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device)
            for n in signature.input_names()
        ]
        with torch.no_grad():
            out = module(*args)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return {
            n: t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy()
            for n, t in zip(signature.output_names(), out)
        }

    return run


def session_signature(session: Any) -> ExportSignature:
    """An onnxruntime session's inputs and outputs as an ExportSignature (axis names kept)."""

    def spec(value: Any) -> TensorSpec:
        dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(
            value.type, value.type.removeprefix("tensor(").removesuffix(")")
        )
        shape = tuple(d if isinstance(d, (int, str)) else "dynamic" for d in value.shape)
        return TensorSpec(value.name, dtype, shape)

    return ExportSignature(
        tuple(spec(v) for v in session.get_inputs()), tuple(spec(v) for v in session.get_outputs())
    )


@dataclass(frozen=True)
class KVPair:
    """One cache tensor: its graph input, the output that updates it, and its sequence axis."""

    input: TensorSpec
    output: str
    axis: int


class GraphDecoder:
    """Run prefill + decode steps of a generate graph; ``inplace`` says how its cache grows."""

    def __init__(
        self, signature: ExportSignature, kv_shapes: dict[str, tuple[int, ...]] | None = None
    ):
        """``kv_shapes``: each KV input's shape (heads, dims); by default the signature's own,
        which must then give those axes as numbers."""
        names = signature.input_names()
        if "input_ids" not in names:
            raise UnknownGraphLayout("a generate graph needs an 'input_ids' input")
        self.signature = signature
        ids_spec = signature.inputs[names.index("input_ids")]
        self.seq_axis_name = ids_spec.shape[1]
        outputs = {o.name.split(".", 1)[-1]: o for o in signature.outputs if "." in o.name}
        self.kv: list[KVPair] = []
        self.paged = "block_table" in names
        for spec in signature.inputs:
            if spec.name in ("input_ids", "position_ids", *MASK_ROLES, *PAGED_INPUTS):
                continue
            suffix = spec.name.split(".", 1)[-1]
            if len(spec.shape) < 3 or "." not in spec.name or suffix not in outputs:
                raise UnknownGraphLayout(f"cannot tell the role of generate input {spec.name!r}")
            dynamic = [i for i, d in enumerate(spec.shape) if isinstance(d, str) and i > 0]
            axis = 2 if self.paged else (dynamic[0] if dynamic else 2)
            self.kv.append(KVPair(spec, outputs[suffix].name, axis))
        if not self.kv:
            raise UnknownGraphLayout("a generate graph needs KV cache inputs")
        out = next(o for o in signature.outputs if o.name == self.kv[0].output)
        self.inplace = out.shape[self.kv[0].axis] == self.seq_axis_name
        self.kv_shapes = kv_shapes or {
            p.input.name: tuple(d if isinstance(d, int) else 1 for d in p.input.shape)
            for p in self.kv
        }
        self.inputs = set(names)

    def _empty_cache(self, batch: int, length: int) -> dict[str, np.ndarray]:
        cache = {}
        for pair in self.kv:
            shape = list(self.kv_shapes[pair.input.name])
            shape[0], shape[pair.axis] = batch, length
            cache[pair.input.name] = np.zeros(shape, dtype=pair.input.dtype)
        return cache

    def _feeds(self, ids, positions, new_mask, cache, cache_valid) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, **cache}
        optional = {
            "position_ids": positions,
            "attention_mask": np.concatenate([cache_valid, new_mask], axis=1),
            "cache_mask": cache_valid,
            "new_mask": new_mask,
        }
        feeds.update({k: v for k, v in optional.items() if k in self.inputs})
        return feeds

    def prefill_logits(self, run: Runner, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) for whole left-padded sequences with an empty cache."""
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        if self.paged:
            pool = PagedPool(self, len(ids), 1)
            return run(pool.feeds(ids, positions, mask))[self.signature.outputs[0].name]
        cache = self._empty_cache(len(ids), 0)
        out = run(self._feeds(ids, positions, mask, cache, np.zeros((len(ids), 0), np.int64)))
        return out[self.signature.outputs[0].name]

    def generate(
        self,
        run: Runner,
        prompts: list[list[int]],
        max_new: int,
        pad_id: int = 0,
        pick: Pick = greedy_pick,
        stop_id: int | None = None,
        on_step: Callable[[int], None] | None = None,
        context: int | None = None,
    ) -> np.ndarray:
        """Decode up to ``max_new`` tokens for left-padded ``prompts`` at once: (B, steps).

        ``pick`` chooses each step's tokens from the last position's logits (greedy by
        default). With ``stop_id``, decoding ends early once every row has produced it (the
        rows keep the tokens after it). ``on_step(step)`` runs as soon as a step's tokens exist.
        With ``context`` (the model's learned positions), positions stop at ``context - 1``: a
        static batch runs to its longest output, so a row with a long prompt keeps stepping
        after its own tokens are done, and those (discarded) tokens must not index past the
        position table.
        """
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), pad_id, dtype=np.int64)
        new_mask = np.zeros((batch, width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            new_mask[row, width - len(prompt) :] = 1
        positions = np.where(new_mask == 1, np.cumsum(new_mask, axis=1) - 1, 0).astype(np.int64)
        if self.paged:
            return self._generate_paged(
                run, ids, positions, new_mask, max_new, pick, stop_id, on_step, context
            )
        length = width + max_new if self.inplace else 0
        cache = self._empty_cache(batch, length)
        cache_valid = np.zeros((batch, length), dtype=np.int64)
        filled = 0  # buffer slots written so far (inplace only)
        tokens = np.zeros((batch, max_new), dtype=np.int64)
        stopped = np.zeros(batch, dtype=bool)
        logits_name = self.signature.outputs[0].name
        for step in range(max_new):
            out = run(self._feeds(ids, positions, new_mask, cache, cache_valid))
            if _next_tokens(tokens, step, out[logits_name][:, -1], pick, stopped, stop_id, on_step):
                return tokens[:, : step + 1]
            if step + 1 == max_new:
                break  # the last tokens need no forward pass
            seq = ids.shape[1]
            for pair in self.kv:
                new = out[pair.output]
                if self.inplace:
                    index = [slice(None)] * new.ndim
                    index[pair.axis] = slice(filled, filled + seq)
                    cache[pair.input.name][tuple(index)] = new
                else:
                    cache[pair.input.name] = new
            if self.inplace:
                cache_valid[:, filled : filled + seq] = new_mask
                filled += seq
            else:
                cache_valid = np.concatenate([cache_valid, new_mask], axis=1)
            positions = _advance(positions, context)
            ids, new_mask = tokens[:, step : step + 1].copy(), np.ones((batch, 1), np.int64)
        return tokens

    def _generate_paged(
        self, run, ids, positions, new_mask, max_new: int, pick: Pick, stop_id, on_step, context
    ) -> np.ndarray:
        batch = len(ids)
        pool = PagedPool(self, batch, ids.shape[1] + max_new)
        tokens = np.zeros((batch, max_new), dtype=np.int64)
        stopped = np.zeros(batch, dtype=bool)
        logits_name = self.signature.outputs[0].name
        for step in range(max_new):
            out = run(pool.feeds(ids, positions, new_mask))
            if _next_tokens(tokens, step, out[logits_name][:, -1], pick, stopped, stop_id, on_step):
                return tokens[:, : step + 1]
            pool.append(out, new_mask)
            positions = _advance(positions, context)
            ids, new_mask = tokens[:, step : step + 1].copy(), np.ones((batch, 1), np.int64)
        return tokens


def _advance(positions: np.ndarray, context: int | None) -> np.ndarray:
    """The next step's positions (B, 1): one past each row's last, at most ``context - 1``."""
    nxt = positions.max(axis=1, keepdims=True) + 1
    return nxt if context is None else np.minimum(nxt, context - 1)


def _next_tokens(tokens, step, logits, pick: Pick, stopped, stop_id, on_step) -> bool:
    """Write step ``step``'s picks into ``tokens``; True once every row has produced ``stop_id``."""
    tokens[:, step] = pick(logits, step)
    if on_step is not None:
        on_step(step)
    if stop_id is None:
        return False
    stopped |= tokens[:, step] == stop_id
    return bool(stopped.all())


class PagedPool:
    """A paged graph's cache for ``batch`` rows of up to ``capacity`` tokens each.

    Row b owns blocks ``b, b + batch, b + 2 * batch, ...`` (interleaved, so no row's blocks are
    contiguous and the table really is followed); its cached tokens are written in order.
    """

    def __init__(self, decoder: GraphDecoder, batch: int, capacity: int):
        self.decoder = decoder
        first = decoder.kv[0].input
        self.block_size = int(first.shape[2])
        nb = max(1, -(-capacity // self.block_size))
        self.table = (np.arange(nb)[None, :] * batch + np.arange(batch)[:, None]).astype(np.int64)
        self.owner = np.repeat(np.arange(batch, dtype=np.int64)[None, :], nb, 0).reshape(-1)
        self.index = np.repeat(np.arange(nb, dtype=np.int64), batch)
        self.lens = np.zeros(batch, np.int64)
        self.pools = {}
        for pair in decoder.kv:
            shape = list(decoder.kv_shapes[pair.input.name])
            shape[0] = nb * batch
            self.pools[pair.input.name] = np.zeros(shape, dtype=pair.input.dtype)

    def feeds(self, ids, positions, new_mask) -> dict[str, np.ndarray]:
        """The graph's inputs for new tokens ``ids`` after what the pool holds."""
        dtype = self.decoder.kv[0].input.dtype  # the pools' float type, the weights' too
        paged = paged_inputs(
            new_mask, self.lens, self.table, self.owner, self.index, self.block_size, dtype
        )
        return {"input_ids": ids, "position_ids": positions, **paged, **self.pools}

    def append(self, out: dict[str, np.ndarray], new_mask: np.ndarray) -> None:
        """Write the step's new keys/values (real tokens only) after each row's cache."""
        rows, cols = np.nonzero(new_mask)
        pos = self.lens[rows] + (np.cumsum(new_mask, axis=1) - 1)[rows, cols]
        blocks = self.table[rows, pos // self.block_size]
        for pair in self.decoder.kv:
            new = out[pair.output]  # (B, H, S, D)
            self.pools[pair.input.name][blocks, :, pos % self.block_size] = new[rows, :, cols]
        self.lens += new_mask.sum(axis=1)
