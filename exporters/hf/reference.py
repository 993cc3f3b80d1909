"""Validate graphs exported from a Hugging Face directory against ``transformers`` itself.

The usual validation compares each graph with the architecture's torch module; this compares
it with the model a user of the directory runs (``AutoModelFor...from_pretrained``), so a wrong
weight mapping or a numerics difference between the plugin's module and transformers fails too:

* ``generate``: 64 greedy tokens through each graph and its KV cache equal ``generate`` on 12
  prompts (fp32); in fp16, teacher-forced top-1 agreement >= 99% with transformers' logits.
* ``classify``: 64 texts tokenized the way the runtime tokenizes them (checked equal to
  ``AutoTokenizer``), run in batches padded to different widths: logits within 1e-4 of
  transformers' on each text alone and the same argmax (fp32); in fp16, >= 99.5% same argmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.extras import missing_extra
from engine.hf_family import HFFamily
from exporters.base import (
    FP16_MIN_TOP1,
    AgreementTooLow,
    LabelMismatch,
    ValuesMismatch,
    greedy_agreement,
    require_identical_greedy,
    require_label_agreement,
)
from exporters.memory import release_memory

GREEDY_TOKENS = 64
CLASSIFY_ATOL = 1e-4
PAD_EXTRA = (0, 3, 17, None)  # extra padding per batch of 16 texts; None: to max_length
PROMPTS = (  # code and prose: what a GPT-2 is asked to continue
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Config:\n    def __init__(self, ",
    "for i in range(len(",
    "    return self.",
    "if __name__ == '__main__':\n    ",
    "with open(path, encoding='utf-8') as f:\n",
    "# Copyright (c) the authors.\n",
    "The quick brown fox",
    "Once upon a time, there was a",
    "In 1905, Albert Einstein published",
    "A model repository holds",
)
SENTENCES = (  # plain, cased, punctuated, accented, CJK, numbers: what a tokenizer normalizes
    "Return the event loop for the current OS thread.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "ok",
    "Déjà vu: naïve café owners rarely résumé.",
    "Parse a URL into six components, returning a 6-item named tuple.",
    "这是一个测试句子。",
    "x = [1, 2, 3]  # a list of 3 numbers, 42.5% full",
    "Raise ValueError if the string is not a valid identifier!",
    "Hello, World",
    "Encode the object as JSON and write it to the stream.",
    "tabs\tand\nnewlines   and   spaces",
    "An HTTP/1.1 request with Keep-Alive headers",
    "e-mail: someone@example.com, phone +1 (555) 010-9999",
    "Return True if all elements of the iterable are true (or if it is empty).",
    "Compile a regular expression pattern, returning a Pattern object.",
    "The end.",
)


def require_transformers(why: str) -> Any:
    """Import transformers or raise the missing-extra error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise missing_extra(why, "hf", "transformers") from None
    transformers.logging.set_verbosity_error()  # our progress display is the one shown
    transformers.utils.logging.disable_progress_bar()
    return transformers


def texts_64() -> list[str]:
    """64 texts in four groups of 16 of growing length: as they are, upper-cased, doubled, and
    repeated 40 times (longer than any max length, so they are truncated)."""
    return [
        *SENTENCES,
        *(s.upper() for s in SENTENCES),
        *(f"{s} {s.lower()}" for s in SENTENCES),
        *(" ".join([s] * 40) for s in SENTENCES),
    ]


class TransformersReference:
    """The directory's own model in transformers, loaded on first use (eager attention, fp32)."""

    name = "transformers"

    def __init__(self, path: Path, family: HFFamily, hf_config: dict[str, Any]):
        self.path, self.family, self.hf_config = Path(path), family, hf_config
        self._model: Any = None

    def require(self) -> None:
        """Fail now, with the pip command, if transformers is missing."""
        require_transformers(
            f"checking {self.path.name} against transformers (--no-validate skips it)"
        )

    def model(self) -> Any:
        """``AutoModelFor...from_pretrained`` on the directory, in fp32 and eval mode."""
        transformers = require_transformers("validating a Hugging Face import")
        if self._model is None:
            auto = getattr(transformers, self.family.auto_class)
            model = auto.from_pretrained(str(self.path), attn_implementation="eager")
            self._model = model.float().eval()
        return self._model

    def release(self) -> None:
        """Drop the transformers model (its memory goes back before the next stage)."""
        self._model = None

    def check(self, arch, config, artifacts_dir: Path, graphs: dict[str, dict], fp16: bool):
        """Compare every graph with transformers for the architecture's task; return figures."""
        against = self.prepare(arch, config, artifacts_dir, fp16)
        for variant, g in graphs.items():
            against.add(variant, g)
        return against.result()

    def prepare(self, arch, config, artifacts_dir: Path, fp16: bool) -> Any:
        """Compute transformers' outputs once and drop its model; graphs are then checked one
        by one against them (``add(variant, graph)``, then ``result()``)."""
        import transformers

        checks = {"generate": _GenerateReference, "classify": _ClassifyReference}
        if arch.task not in checks:
            raise EngineError(f"no transformers check for task {arch.task!r}")
        header = {
            "library": f"transformers {transformers.__version__}",
            "class": self.family.hf_architecture,
            "attention": "eager",
        }
        try:
            return checks[arch.task](self, arch, config, Path(artifacts_dir), fp16, header)
        finally:
            self.release()
            release_memory()  # the model's tensors go back before the graphs' sessions open


class _GenerateReference:
    """transformers' greedy tokens (and, in fp16, its teacher-forced top-1), checked per graph."""

    def __init__(self, ref: TransformersReference, arch, config, artifacts_dir, fp16, header):
        import torch
        from tokenizers import Tokenizer

        from exporters.provenance import context_length

        self.arch, self.config, self.fp16 = arch, config, fp16
        serving = arch.serving_metadata(config, artifacts_dir)
        tokenizer = Tokenizer.from_file(str(artifacts_dir / serving["tokenizer"]))
        self.pad_id = pad_id = int(serving.get("pad_token_id") or 0)
        max_new = min(GREEDY_TOKENS, (context_length(serving) or 2 * GREEDY_TOKENS) // 2)
        longest = (context_length(serving) or 10**9) - max_new
        self.prompts = [tokenizer.encode(p).ids[-longest:] or [pad_id] for p in PROMPTS]
        self.max_new = max_new
        model = ref.model()
        self.expected = np.stack([_generate(model, p, max_new, pad_id) for p in self.prompts])
        self.top: list[np.ndarray] = []  # fp16: transformers' argmax at each step of each row
        if fp16:
            with torch.no_grad():
                for r in self._rows():
                    self.top.append(model(torch.tensor([r])).logits[0].argmax(-1).numpy())
        self.report: dict[str, Any] = {
            **header,
            "prompts": len(self.prompts),
            "new_tokens": max_new,
            "reference": "generate(do_sample=False), one prompt at a time",
            "graphs": {},
        }

    def _rows(self) -> list[list[int]]:
        """Each prompt followed by transformers' greedy continuation."""
        return [list(p) + self.expected[i].tolist() for i, p in enumerate(self.prompts)]

    def add(self, variant: str, g: dict) -> None:
        """Check one graph's greedy tokens (and fp16 top-1) against transformers'."""
        from engine.graph_decoder import GraphDecoder

        example = self.arch.example_inputs(self.config, 1, 1, 0, seed=0, variant=variant)
        decoder = GraphDecoder(g["signature"], {k: v.shape for k, v in example.items()})
        tokens = decoder.generate(g["onnx"], self.prompts, self.max_new, self.pad_id)
        entry: dict[str, Any] = greedy_agreement(tokens, self.expected)
        if not self.fp16:
            require_identical_greedy(
                tokens, self.expected, f"graph {variant!r}", "ONNX", "transformers generate"
            )
        if self.fp16:
            entry.update(self._top1(decoder, g, variant))
        self.report["graphs"][variant] = entry

    def _top1(self, decoder, g, variant: str) -> dict:
        """Teacher-forced top-1 agreement of an fp16 graph with transformers over the rows."""
        rows = self._rows()
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        got = decoder.prefill_logits(g["onnx"], ids, mask).argmax(-1)
        agree, total = 0, 0
        for i, r in enumerate(rows):
            agree += int((got[i, width - len(r) :] == self.top[i]).sum())
            total += len(r)
        top1 = agree / total
        if top1 < FP16_MIN_TOP1:
            raise AgreementTooLow(
                f"graph {variant!r} (fp16): teacher-forced top-1 agreement with transformers "
                f"{top1:.2%} is below {FP16_MIN_TOP1:.0%}; export in fp32"
            )
        return {"teacher_forced_steps": total, "top1_agreement": top1}

    def result(self) -> dict:
        """The manifest's ``reference`` section."""
        return self.report


def _generate(model: Any, prompt: list[int], max_new: int, pad_id: int) -> np.ndarray:
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    config = GenerationConfig(  # exactly max_new greedy tokens: nothing stops or suppresses
        max_new_tokens=max_new,
        min_new_tokens=None,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=pad_id,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    return out[0, len(prompt) :].numpy()


class _ClassifyReference:
    """transformers' logits on 64 texts, each alone; graphs run them padded, checked per graph."""

    def __init__(self, ref: TransformersReference, arch, config, artifacts_dir, fp16, header):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        from engine.runtime.batched_engines import encode_texts, prepare_tokenizer

        self.fp16 = fp16
        serving = arch.serving_metadata(config, artifacts_dir)
        self.max_length, self.pad_id = int(serving["max_length"]), int(serving["pad_token_id"])
        self.cls_id = serving.get("cls_token_id")
        tokenizer = Tokenizer.from_file(str(artifacts_dir / serving["tokenizer"]))
        prepare_tokenizer(tokenizer, self.max_length, self.cls_id)
        self.tokenizer = tokenizer
        self.texts = texts = texts_64()
        theirs = AutoTokenizer.from_pretrained(str(ref.path))
        want = theirs(texts, truncation=True, max_length=self.max_length)["input_ids"]
        enc = encode_texts(tokenizer, texts, self.pad_id, self.cls_id)
        mine = [r[m == 1].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
        if mine != want:
            bad = next(i for i, (a, b) in enumerate(zip(mine, want)) if a != b)
            raise LabelMismatch(
                f"the runtime tokenizes {texts[bad][:40]!r} as {mine[bad][:12]}..., "
                f"transformers' AutoTokenizer as {want[bad][:12]}..."
            )
        model = ref.model()
        expected = []
        with torch.no_grad():
            for ids in want:  # each text alone: no padding in the reference
                x = torch.tensor([ids])
                expected.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0])
        self.ref = torch.stack(expected).double().numpy()
        self.report: dict[str, Any] = {
            **header,
            "texts": len(texts),
            "tokenization": "identical to AutoTokenizer(truncation=True)",
            "max_length": self.max_length,
            "graphs": {},
        }

    def add(self, variant: str, g: dict) -> None:
        """Check one graph's logits and argmax on the padded texts against transformers'."""
        from engine.runtime.batched_engines import TYPE_IDS, encode_texts

        texts, ref, fp16, max_length = self.texts, self.ref, self.fp16, self.max_length
        takes_types = TYPE_IDS in g["signature"].input_names()
        got, widths = [], []
        for b, extra in enumerate(PAD_EXTRA):
            feeds = encode_texts(
                self.tokenizer, texts[b * 16 : (b + 1) * 16], self.pad_id, self.cls_id, takes_types
            )
            width = feeds["input_ids"].shape[1]
            target = max_length if extra is None else min(max_length, width + extra)
            fill = {"input_ids": self.pad_id}  # masks and segment ids pad with 0
            feeds = {
                k: np.pad(v, ((0, 0), (0, target - width)), constant_values=fill.get(k, 0))
                for k, v in feeds.items()
            }
            widths.append(target)
            got.append(g["onnx"](feeds)[g["signature"].output_names()[0]])
        logits = np.concatenate(got).astype(np.float64)
        diff = float(np.abs(logits - ref).max())
        report = {"padded_widths": widths, "max_abs_logit_diff": diff}
        self.report["graphs"][variant] = report
        what = f"graph {variant!r}"
        report["argmax_agreement"] = require_label_agreement(
            logits.argmax(-1), ref.argmax(-1), fp16, what, "transformers", "texts"
        )
        if not fp16 and diff > CLASSIFY_ATOL:
            raise ValuesMismatch(
                f"graph {variant!r}: logits differ from transformers by up to {diff:.3g} "
                f"(> {CLASSIFY_ATOL:g}) over {len(texts)} padded texts"
            )

    def result(self) -> dict:
        """The manifest's ``reference`` section."""
        return self.report
