"""Hugging Face ``transformers`` ``generate`` on the same weights: the framework baseline.

The weights are a ``torch``-format version of the benchmarked model (``engine export --format
torch``) or, if given, its checkpoint; :func:`plugins.decoder_lm.model.to_gpt2_state_dict` maps
them onto ``GPT2LMHeadModel``. Generation is greedy and makes exactly ``output_len`` tokens: no
end-of-text id is configured, so nothing stops a row early and nothing is suppressed
(``min_new_tokens`` would mask end-of-text, which the engine's ``ignore_eos`` does not, and the
tokens would differ). ``concurrency`` prompts run as one left-padded batch, batch after batch.

``hf-static`` is the same ``generate`` with a static KV cache (``cache_implementation="static"``),
which transformers compiles with ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs) on
CUDA: its fastest generate. A compiled step is specialised to the batch size, so that baseline
warms up once at every load before it is measured; on CPU it runs the static cache uncompiled.

Timestamps come from a ``StoppingCriteria``: ``generate`` calls it once per step, right after
the step's tokens are appended; on CUDA it synchronises first, so a stamp is when the tokens
exist, as a streamer would see them.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.baselines.base import BatchedBaseline, Unavailable

INSTALL = "pip install -e '.[bench]'"


def require_transformers() -> None:
    """Raise :class:`Unavailable` saying how to install transformers if it is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"transformers is not installed ({exc}); {INSTALL}") from None


def find_weights(repo: Path | None, model: str | None, checkpoint: Path | None = None) -> Path:
    """The newest torch-format version of ``model`` in ``repo``, else ``checkpoint``.

    A version and an engine checkpoint hold ``model.safetensors`` and the engine's
    ``config.json``; ``checkpoint`` may also be the Hugging Face directory a model was imported
    from (the manifest records it), which then loads as it is. A version's files are checked
    against its manifest; it comes first because the checkpoint a manifest names may since have
    been retrained or moved.
    """
    from engine.repository import read_manifest, verify_files, versions

    for version in reversed(versions(Path(repo), model) if repo and model else []):
        path = Path(repo) / model / str(version)
        if read_manifest(path).format == "torch":
            verify_files(path)
            return path
    if checkpoint is not None and Path(checkpoint).is_dir():
        return Path(checkpoint)
    raise Unavailable(
        f"no torch-format version of {model!r} in {repo}"
        + (f" and no checkpoint at {checkpoint}" if checkpoint else "")
        + f": export one with `engine export CHECKPOINT --repo {repo} --name {model} "
        "--format torch`"
    )


def load_gpt2(weights: Path, device: str = "cpu", dtype: Any = None) -> tuple[Any, int]:
    """``GPT2LMHeadModel`` for ``weights`` (ours, or a Hugging Face directory); model, pad id."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine import checkpoint
    from exporters.source import source_kind
    from plugins.decoder_lm.model import to_gpt2_state_dict

    dtype = torch_dtype(dtype, device)
    if source_kind(weights) == "huggingface":  # the directory an export was imported from
        hf = GPT2LMHeadModel.from_pretrained(str(weights), dtype=dtype)
        eos = hf.config.eos_token_id
        pad_id = int(hf.config.pad_token_id if hf.config.pad_token_id is not None else eos or 0)
        hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = pad_id
        return hf.to(device=device).eval(), pad_id
    arch, config, ours = checkpoint.load(weights)
    serving = arch.serving_metadata(config, weights)
    pad_id = int(serving.get("pad_token_id", 0))
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",  # tanh GELU, as ours
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,  # generate never stops early
        pad_token_id=pad_id,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf.load_state_dict(to_gpt2_state_dict(ours.state_dict()), strict=False)
    if missing or unexpected:
        raise Unavailable(
            f"the weights in {weights} are not GPT-2-shaped: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = pad_id
    return hf.to(device=device, dtype=dtype).eval(), pad_id


def clamp_positions(model: Any) -> None:
    """Make ``model`` clamp its position ids to its last position (in place).

    A static batch runs until its longest request has all its tokens, so a row with a long
    prompt keeps stepping past its own output and can reach positions past the context, where
    GPT-2's position table ends (an IndexError that fails the whole batch). Those steps' tokens
    are discarded; a row's own tokens never reach the clamp (each request fits the context), so
    it changes no token that is kept (as ``GraphDecoder.generate(context=)`` for the bare loop).
    transformers computes the ids inside the model: the clamp is a pre-hook on GPT-2's position
    table; a runtime without one (Optimum's onnxruntime model) gets them as ``position_ids``.
    """
    limit = int(getattr(model.config, "n_positions", 0) or 0)
    if not limit:
        return
    table = getattr(getattr(model, "transformer", None), "wpe", None)
    if table is not None:
        table.register_forward_pre_hook(lambda _, args: (args[0].clamp(max=limit - 1),))
        return
    forward = model.forward

    @functools.wraps(forward)  # generate reads the signature to check its arguments
    def clamped(*args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = positions.clamp(max=limit - 1)
        return forward(*args, **kwargs)

    model.forward = clamped


def torch_dtype(name: Any, device: str) -> Any:
    """A torch dtype from a name (float16, fp16, ...) or None: float16 on CUDA, else float32."""
    import torch

    if name is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise Unavailable(f"unknown dtype {name!r}; choose float32, float16 or bfloat16")
    return value


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) ids and attention mask with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def stamp_criteria(times: list[float], sync: bool) -> Any:
    """A ``StoppingCriteriaList`` that appends ``perf_counter()`` per step and never stops."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if sync:
                torch.cuda.synchronize(input_ids.device)
            times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stamp()])


class HFGenerate(BatchedBaseline):
    """``GPT2LMHeadModel.generate``, greedy, static left-padded batches."""

    name = "hf"
    description = "Hugging Face transformers GPT2LMHeadModel.generate, greedy, static batches"

    def __init__(
        self,
        repo: Path | None = None,
        model: str | None = None,
        threads: int | None = None,
        checkpoint: Path | None = None,
        device: str = "cpu",
        dtype: str | None = None,
    ):
        """Load the weights of ``model`` (see :func:`find_weights`) onto ``device``."""
        reason = self.why_unavailable(device)
        if reason:
            raise Unavailable(reason)
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device, self.threads, self.dtype = device, threads, dtype
        self.weights = find_weights(repo, model, checkpoint)
        self.model, self.pad_id = self._load()
        clamp_positions(self.model)

    @staticmethod
    def why_unavailable(device: str) -> str | None:
        """Why this baseline cannot run on ``device`` here (a package, a GPU), or None."""
        try:
            require_transformers()
        except Unavailable as exc:
            return str(exc)
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            return f"device {device!r} asked for, but torch sees no CUDA GPU"
        return None

    def _load(self) -> tuple[Any, int]:
        """The model whose ``generate`` runs (subclasses swap in another runtime)."""
        return load_gpt2(self.weights, self.device, self.dtype)

    def generate(self, prompts: list[list[int]], output_len: int) -> tuple[np.ndarray, list[float]]:
        """Greedy ``output_len`` tokens for one batch: (B, output_len) ids and step times."""
        import torch

        ids, mask = left_pad(prompts, self.pad_id)
        device = getattr(self.model, "device", self.device)
        times: list[float] = []
        stamps = stamp_criteria(times, sync=torch.device(device).type == "cuda")
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                max_new_tokens=output_len,
                do_sample=False,
                use_cache=True,
                stopping_criteria=stamps,
                **self.generate_options(),
            )
        return out[:, ids.shape[1] :].cpu().numpy(), times

    def generate_options(self) -> dict[str, Any]:
        """Extra ``generate`` arguments (none: transformers' default dynamic cache, eager)."""
        return {}

    def generate_batch(
        self, prompts: list[list[int]], output_len: int
    ) -> tuple[list[float], np.ndarray]:
        """One batch's :meth:`generate`: each step's time and the tokens."""
        tokens, times = self.generate(prompts, output_len)
        return times, tokens

    def describe(self) -> dict[str, Any]:
        """Library versions, device, dtype and where the weights came from."""
        import torch
        import transformers

        return {
            **super().describe(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": self.device,
            "dtype": str(getattr(self.model, "dtype", "")).replace("torch.", ""),
            "threads": self.threads or torch.get_num_threads(),
            "weights": str(self.weights),
        }

    def close(self) -> None:
        """Drop the model (and its GPU memory)."""
        self.model = None


class HFStaticCompiled(HFGenerate):
    """``generate`` with a static KV cache, compiled by transformers on CUDA (reduce-overhead)."""

    name = "hf-static"
    description = (
        "Hugging Face transformers generate, static KV cache, torch.compile "
        "(mode reduce-overhead) on CUDA; greedy, static batches"
    )
    warmup_each_load = True  # a compiled step is specialised to its batch size

    @staticmethod
    def why_unavailable(device: str) -> str | None:
        """HFGenerate's reasons, and a transformers whose GPT-2 cannot compile a static cache."""
        reason = HFGenerate.why_unavailable(device)
        if reason:
            return reason
        import transformers
        from transformers import GPT2LMHeadModel

        try:
            from transformers import CompileConfig  # noqa: F401
        except ImportError:
            return f"transformers {transformers.__version__} has no CompileConfig (needs >= 4.47)"
        if not (
            getattr(GPT2LMHeadModel, "_can_compile_fullgraph", False)
            or getattr(GPT2LMHeadModel, "_supports_static_cache", False)
        ):
            return f"GPT-2 in transformers {transformers.__version__} has no static cache"
        return None

    @property
    def compiled(self) -> bool:
        """True where transformers compiles the decode step (CUDA); False on CPU."""
        return self.device.startswith("cuda")

    def generate_options(self) -> dict[str, Any]:
        """A static cache; on CUDA transformers compiles every decode step it runs."""
        from transformers import CompileConfig

        options: dict[str, Any] = {"cache_implementation": "static"}
        if self.compiled:
            options["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
        else:
            options["disable_compile"] = True
        return options

    def describe(self) -> dict[str, Any]:
        """HFGenerate's, and whether the steps were compiled."""
        return {**super().describe(), "cache": "static", "compiled": self.compiled}
