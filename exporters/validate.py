"""Validate exported graphs against PyTorch: names, then shapes, then values, then the task.

Like Optimum's exporters, in three steps with a distinct error each, but failing instead of
warning. Step 2 and 3 run every graph over several input sizes made by the architecture's
``example_inputs`` (batch 1, uneven rows, cache length 0). Then one task-level check, generic
over the task: greedy tokens through the KV cache (``generate``), predicted labels
(``classify``), pixel error (``sample_images``). Every figure goes into the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from engine.architecture import ExportSignature
from engine.graph_decoder import GraphDecoder, Runner, ort_runner, torch_runner
from exporters.base import (
    FP16_MIN_TOP1,
    AgreementTooLow,
    GreedyMismatch,
    OutputNamesMismatch,
    PixelErrorTooLarge,
    ShapeMismatch,
    UnknownTask,
    ValuesMismatch,
    greedy_agreement,
    require_identical_greedy,
    require_label_agreement,
)
from exporters.memory import release_memory
from exporters.onnx_export import context_length
from exporters.progress import Stages

# (batch, seq, past): batch 1, one token, empty cache, uneven rows, decode steps on a cache
CASES = ((1, 1, 0), (1, 7, 0), (3, 5, 0), (2, 1, 4), (4, 3, 6))
GREEDY_TOKENS = 64
MIN_GREEDY_PROMPTS = 8
CLASSIFY_ROWS = 256
IMAGE_ROWS = 256
SNIPPETS = (  # Python prompts for LMs that ship a tokenizer; random ids otherwise
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Config:\n    def __init__(self, ",
    "for i in range(len(",
    "    return self.",
    "if __name__ == '__main__':\n    ",
    "try:\n    import ",
    "with open(path, encoding='utf-8') as f:\n",
)


def ort_session(path: Path) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session: validation runs small batches, and spinning
    worker threads on a shared machine cost more than they gain (measured: 30x on 2 busy cores).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- the three steps ---------------------------------------------------------------------------
def check_names(session: ort.InferenceSession, signature: ExportSignature, variant: str) -> None:
    """Step 1: the graph's inputs and outputs carry the signature's names, in order."""
    for kind, got, want in (
        ("inputs", [i.name for i in session.get_inputs()], signature.input_names()),
        ("outputs", [o.name for o in session.get_outputs()], signature.output_names()),
    ):
        if got != want:
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise OutputNamesMismatch(
                f"graph {variant!r}: {kind} are {got}, the signature declares {want}"
                f" (missing {missing}, unexpected {extra})"
            )


def run_cases(arch, config, variant: str, onnx_run: Runner, torch_run: Runner) -> list[dict]:
    """Run both runners on each case of :data:`CASES`; keep inputs and both outputs."""
    results = []
    for seed, (batch, seq, past) in enumerate(CASES):
        feeds = arch.example_inputs(config, batch, seq, past, seed=seed, variant=variant)
        results.append(
            {
                "case": {"batch": batch, "seq": seq, "past": past},
                "feeds": feeds,
                "onnx": onnx_run(feeds),
                "torch": torch_run(feeds),
            }
        )
    return results


def check_shapes(signature: ExportSignature, results: list[dict], variant: str) -> None:
    """Step 2: every output's shape equals PyTorch's and fits the signature's axes."""
    for r in results:
        sizes: dict[str, int] = {}  # dynamic axis name -> size, bound by the inputs
        for spec in signature.inputs:
            for axis, axis_name in spec.dynamic_axes().items():
                sizes.setdefault(axis_name, r["feeds"][spec.name].shape[axis])
        for spec in signature.outputs:
            got, ref = r["onnx"][spec.name].shape, r["torch"][spec.name].shape
            want = tuple(sizes.get(d, "?") if isinstance(d, str) else d for d in spec.shape)
            fits = len(got) == len(want) and all(w in ("?", g) for g, w in zip(got, want))
            if got != ref or not fits:
                raise ShapeMismatch(
                    f"graph {variant!r}, output {spec.name!r} at {r['case']}: ONNX shape "
                    f"{got}, PyTorch {ref}, signature {spec.shape} -> {want}"
                )


def check_values(
    signature: ExportSignature,
    results: list[dict],
    variant: str,
    fp16: bool,
    quantized: bool = False,
) -> dict[str, Any]:
    """Step 3: outputs match PyTorch within the signature's (fp32 or fp16) tolerance.

    A quantized graph's differences are reported only: its floors are accuracy on held-out data
    (:mod:`exporters.validate_quantized`), not a per-value tolerance.
    """
    atol, rtol = (
        (signature.fp16_atol, signature.fp16_rtol) if fp16 else (signature.atol, signature.rtol)
    )
    worst: dict[str, float] = {}
    for r in results:
        for name in signature.output_names():
            got, ref = r["onnx"][name].astype(np.float64), r["torch"][name].astype(np.float64)
            err = float(np.abs(got - ref).max()) if got.size else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
            if quantized:
                continue
            if not np.allclose(got, ref, atol=atol, rtol=rtol, equal_nan=True):
                raise ValuesMismatch(
                    f"graph {variant!r}, output {name!r} at {r['case']}: max abs difference "
                    f"{err:.3g} exceeds atol={atol:g} + rtol={rtol:g}*|torch|"
                )
    if quantized:
        return {"tolerance": "none (held-out accuracy floors instead)", "max_abs_diff": worst}
    return {"atol": atol, "rtol": rtol, "max_abs_diff": worst}


# -- task checks ----------------------------------------------------------------------------
def _prompts(serving: dict[str, Any], ckpt_dir: Path, vocab: int, longest: int) -> list[list[int]]:
    """Python snippets through the checkpoint's tokenizer where it has one, plus random ids."""
    rng = np.random.default_rng(0)
    prompts = []
    tokenizer_file = Path(ckpt_dir) / str(serving.get("tokenizer", ""))
    if serving.get("tokenizer") and tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        prompts = [tokenizer.encode(s).ids[-longest:] for s in SNIPPETS]
        prompts = [p for p in prompts if p and max(p) < vocab]
    while len(prompts) < MIN_GREEDY_PROMPTS + 4:  # random rows of uneven length as well
        length = int(rng.integers(1, longest + 1))
        prompts.append(rng.integers(4 if vocab > 8 else 0, vocab, length).tolist())
    return prompts


class GenerateCheck:
    """Greedy tokens through each graph's KV cache equal PyTorch's (fp32) or top-1 agrees (fp16).

    Graph by graph (:meth:`add`), so validation holds one onnxruntime session at a time; every
    graph's PyTorch tokens must also equal the first graph's (they serve the same model).
    """

    def __init__(self, arch, config, ckpt_dir: Path, fp16: bool):
        self.arch, self.config, self.ckpt_dir, self.fp16 = arch, config, Path(ckpt_dir), fp16
        self.serving = arch.serving_metadata(config, ckpt_dir)
        ctx = context_length(self.serving) or 10**9
        self.max_new = min(GREEDY_TOKENS, ctx // 2)
        self.pad_id = int(self.serving.get("pad_token_id", 0))
        self.longest = min(24, ctx - self.max_new)
        self.prompts: list[list[int]] | None = None  # drawn at the first graph (its vocabulary)
        self.reference: np.ndarray | None = None  # the first graph's PyTorch tokens
        self.main = ""
        self.graphs: dict[str, dict] = {}

    def add(self, variant: str, g: dict) -> None:
        """Check one graph (its ``signature``, ``onnx`` and ``torch`` runners)."""
        if self.prompts is None:
            vocab = g["signature"].outputs[0].shape[-1]
            vocab = vocab if isinstance(vocab, int) else int(self.serving["vocab_size"])
            self.prompts = _prompts(self.serving, self.ckpt_dir, vocab, self.longest)
        prompts, pad_id = self.prompts, self.pad_id
        example = self.arch.example_inputs(self.config, 1, 1, 0, seed=0, variant=variant)
        decoder = GraphDecoder(g["signature"], {k: v.shape for k, v in example.items()})
        ref_tokens = decoder.generate(g["torch"], prompts, self.max_new, pad_id)
        tokens = decoder.generate(g["onnx"], prompts, self.max_new, pad_id)
        entry: dict[str, Any] = {
            "cache": "in place (new keys/values only)" if decoder.inplace else "concatenated",
            **greedy_agreement(tokens, ref_tokens),
        }
        if self.reference is None:
            self.main, self.reference = variant, ref_tokens
        same_as_main = (ref_tokens == self.reference).all(axis=1)
        entry["torch_matches_main_graph_torch"] = bool(same_as_main.all())
        if not same_as_main.all():  # the runtime serves this graph: it must be the same model
            raise GreedyMismatch(
                f"graph {variant!r}: PyTorch through its wrapper picks other greedy tokens than "
                f"through graph {self.main!r} on {int((~same_as_main).sum())} of {len(prompts)} "
                "prompts, so the two graphs would not serve the same model"
            )
        if not self.fp16:
            require_identical_greedy(tokens, ref_tokens, f"graph {variant!r}", "ONNX", "PyTorch")
        if self.fp16:
            entry.update(_teacher_forced(decoder, g, prompts, ref_tokens, pad_id, variant))
        self.graphs[variant] = entry

    def result(self) -> dict:
        """The manifest's figures for every graph added."""
        prompts = len(self.prompts or [])
        return {"prompts": prompts, "new_tokens": self.max_new, "graphs": self.graphs}


def check_generate(arch, config, ckpt_dir: Path, graphs: dict[str, dict], fp16: bool) -> dict:
    """:class:`GenerateCheck` over ``graphs`` (each with its runners open)."""
    return _run_check(GenerateCheck(arch, config, ckpt_dir, fp16), graphs)


def _run_check(check: Any, graphs: dict[str, dict]) -> dict:
    """Add every graph to a per-graph check, in order; return its figures."""
    for variant, g in graphs.items():
        check.add(variant, g)
    return check.result()


def _teacher_forced(decoder, g, prompts, continuation, pad_id: int, variant: str) -> dict:
    """Top-1 agreement and log-prob error over prompt + PyTorch's greedy continuation."""
    rows = [list(p) + continuation[i].tolist() for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    # (B, T, V) float32 logits: 200 MB each at GPT-2 small's vocabulary, so the log-probs are
    # taken at the reference's top token one row at a time, never as (B, T, V) float64 arrays
    got = decoder.prefill_logits(g["onnx"], ids, mask)
    ref = decoder.prefill_logits(g["torch"], ids, mask)
    valid = mask == 1
    top = ref.argmax(-1)  # (B, T)
    agree = float((got.argmax(-1) == top)[valid].mean())
    err = np.abs(_logprob_at(got, top) - _logprob_at(ref, top))[valid]
    del got, ref
    result = {
        "teacher_forced_steps": int(valid.sum()),
        "top1_agreement": agree,
        "logprob_abs_error_max": float(err.max()),
        "logprob_abs_error_mean": float(err.mean()),
    }
    if agree < FP16_MIN_TOP1:
        raise AgreementTooLow(
            f"graph {variant!r} (fp16): teacher-forced top-1 agreement {agree:.2%} is below "
            f"{FP16_MIN_TOP1:.0%} (log-prob error max {err.max():.3g}); export in fp32"
        )
    return result


def _logprob_at(logits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[..., index] for (B, T, V) logits and (B, T) indices, row by row."""
    out = np.empty(index.shape, dtype=np.float64)
    for b in range(len(logits)):
        x = logits[b].astype(np.float64)  # (T, V)
        peak = x.max(axis=-1)
        lse = peak + np.log(np.exp(x - peak[:, None]).sum(axis=-1))
        out[b] = np.take_along_axis(x, index[b][:, None], -1)[:, 0] - lse
    return out


class ClassifyCheck:
    """The graph predicts PyTorch's label for every row (fp32) or >= 99.5% of rows (fp16)."""

    def __init__(self, arch, config, ckpt_dir: Path, fp16: bool):
        self.arch, self.config, self.fp16 = arch, config, fp16
        self.graphs: dict[str, dict] = {}

    def add(self, variant: str, g: dict) -> None:
        """Check one graph (its ``signature``, ``onnx`` and ``torch`` runners)."""
        arch, config, fp16 = self.arch, self.config, self.fp16
        got, ref = [], []
        for seed in range(CLASSIFY_ROWS // 64):
            feeds = arch.example_inputs(
                config, 64, 16 * (seed + 1), 0, seed=100 + seed, variant=variant
            )
            got.append(g["onnx"](feeds)[g["signature"].output_names()[0]].argmax(-1))
            ref.append(g["torch"](feeds)[g["signature"].output_names()[0]].argmax(-1))
        got_all, ref_all = np.concatenate(got), np.concatenate(ref)
        what = f"graph {variant!r}"
        self.graphs[variant] = {"rows": int(got_all.size)}
        agree = require_label_agreement(got_all, ref_all, fp16, what, "PyTorch", "rows")
        self.graphs[variant]["label_agreement"] = agree

    def result(self) -> dict:
        """The manifest's figures for every graph added."""
        return {"graphs": self.graphs}


def check_classify(arch, config, ckpt_dir: Path, graphs: dict[str, dict], fp16: bool) -> dict:
    """:class:`ClassifyCheck` over ``graphs`` (each with its runners open)."""
    return _run_check(ClassifyCheck(arch, config, ckpt_dir, fp16), graphs)


class ImagesCheck:
    """Generated pixels stay within the signature's tolerance of PyTorch's; report the error."""

    def __init__(self, arch, config, ckpt_dir: Path, fp16: bool):
        self.arch, self.config, self.fp16 = arch, config, fp16
        self.graphs: dict[str, dict] = {}

    def add(self, variant: str, g: dict) -> None:
        """Check one graph (its ``signature``, ``onnx`` and ``torch`` runners)."""
        sig, fp16 = g["signature"], self.fp16
        atol, rtol = (sig.fp16_atol, sig.fp16_rtol) if fp16 else (sig.atol, sig.rtol)
        feeds = self.arch.example_inputs(self.config, IMAGE_ROWS, 1, 0, seed=200, variant=variant)
        name = sig.output_names()[0]
        got, ref = g["onnx"](feeds)[name].astype(np.float64), g["torch"](feeds)[name]
        err = np.abs(got - ref)
        self.graphs[variant] = {
            "images": int(len(got)),
            "max_abs_pixel_error": float(err.max()),
            "mean_abs_pixel_error": float(err.mean()),
            "atol": atol,
        }
        if not np.allclose(got, ref, atol=atol, rtol=rtol):
            raise PixelErrorTooLarge(
                f"graph {variant!r}: max abs pixel error {err.max():.3g} over {len(got)} images "
                f"exceeds atol={atol:g} + rtol={rtol:g}*|torch|"
            )

    def result(self) -> dict:
        """The manifest's figures for every graph added."""
        return {"graphs": self.graphs}


def check_images(arch, config, ckpt_dir: Path, graphs: dict[str, dict], fp16: bool) -> dict:
    """:class:`ImagesCheck` over ``graphs`` (each with its runners open)."""
    return _run_check(ImagesCheck(arch, config, ckpt_dir, fp16), graphs)


TASK_CHECKS: dict[str, Callable[..., Any]] = {  # task -> its per-graph check's class
    "generate": GenerateCheck,
    "classify": ClassifyCheck,
    "sample_images": ImagesCheck,
}


def validate_export(
    arch,
    config,
    model: torch.nn.Module,
    ckpt_dir: Path,
    paths: dict[str, Path],
    fp16: bool,
    stages: Stages | None = None,
    reference: Any = None,
    int8: bool = False,
) -> dict[str, Any]:
    """Run all checks on every exported graph; return the manifest's validation section.

    Graph by graph: one onnxruntime session is open at a time, and it is closed once its names,
    shapes, values, task check and reference check have run (at GPT-2 small, each session holds
    0.6-0.8 GiB). ``reference`` (an imported model's original implementation, e.g.
    transformers) computes its outputs once, before any session opens, and lets its model go;
    each graph is then checked against them and its figures go under ``reference``. ``int8``
    graphs are held to accuracy floors on held-out data instead of identical outputs (and not
    compared with a reference implementation, whose fp32 tolerances they exceed).
    """
    stages = stages or Stages(show=False)
    if TASK_CHECKS.get(arch.task) is None:  # a graph nobody checked end to end must not land
        raise UnknownTask(
            f"{arch.name} declares task {arch.task!r}, which has no task-level check (known: "
            f"{', '.join(TASK_CHECKS)}); export with --no-validate to skip validation"
        )
    report: dict[str, Any] = {
        "validated": True,
        "precision": "int8" if int8 else "fp16" if fp16 else "fp32",
        "cases": [dict(zip(("batch", "seq", "past"), c)) for c in CASES],
        "graphs": {},
    }
    if int8:
        from exporters.validate_quantized import QuantizedCheck

        task, task_label = QuantizedCheck(arch, config, ckpt_dir), "int8 on held-out data"
        against = None
    else:
        task, task_label = TASK_CHECKS[arch.task](arch, config, ckpt_dir, fp16), arch.task
        against = None
        if reference is not None:
            with stages.stage(f"{reference.name} reference outputs"):
                against = reference.prepare(arch, config, ckpt_dir, fp16)
    for variant, path in paths.items():
        with stages.stage(f"validate {variant}"):
            signature = arch.export_signature(config, variant)
            session = ort_session(path)
            module = arch.export_module(model, config, variant).eval()
            g = {
                "signature": signature,
                "onnx": ort_runner(session),
                "torch": torch_runner(module, signature),
            }
            check_names(session, signature, variant)
            results = run_cases(arch, config, variant, g["onnx"], g["torch"])
            check_shapes(signature, results, variant)
            values = check_values(signature, results, variant, fp16, quantized=int8)
            report["graphs"][variant] = {"names": "ok", "shapes": "ok", "values": values}
            del results
        with stages.stage(f"validate {task_label} {variant}"):
            task.add(variant, g)
        if against is not None:
            with stages.stage(f"validate {variant} against {reference.name}"):
                against.add(variant, g)
        del g, session, module  # the session's memory goes back before the next graph's
        release_memory()
    report["task"] = {"task": arch.task, **task.result()}
    if against is not None:
        report["reference"] = against.result()
    return report
