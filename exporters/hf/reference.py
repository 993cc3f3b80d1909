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
    AgreementTooLow,
    LabelMismatch,
    ValuesMismatch,
    greedy_agreement,
    require_identical_greedy,
)

GREEDY_TOKENS = 64
FP16_MIN_TOP1 = 0.99
FP16_MIN_LABEL_AGREEMENT = 0.995
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
        import transformers

        checks = {"generate": self._check_generate, "classify": self._check_classify}
        if arch.task not in checks:
            raise EngineError(f"no transformers check for task {arch.task!r}")
        try:
            figures = checks[arch.task](arch, config, Path(artifacts_dir), graphs, fp16)
        finally:
            self.release()
        return {
            "library": f"transformers {transformers.__version__}",
            "class": self.family.hf_architecture,
            "attention": "eager",
            **figures,
        }

    # -- generate -----------------------------------------------------------------------------
    def _check_generate(self, arch, config, artifacts_dir: Path, graphs, fp16: bool) -> dict:
        import torch
        from tokenizers import Tokenizer

        from engine.graph_decoder import GraphDecoder
        from exporters.provenance import context_length

        serving = arch.serving_metadata(config, artifacts_dir)
        tokenizer = Tokenizer.from_file(str(artifacts_dir / serving["tokenizer"]))
        pad_id = int(serving.get("pad_token_id") or 0)
        max_new = min(GREEDY_TOKENS, (context_length(serving) or 2 * GREEDY_TOKENS) // 2)
        longest = (context_length(serving) or 10**9) - max_new
        prompts = [tokenizer.encode(p).ids[-longest:] or [pad_id] for p in PROMPTS]
        model = self.model()
        expected = np.stack([self._generate(model, p, max_new, pad_id) for p in prompts])
        report: dict[str, Any] = {
            "prompts": len(prompts),
            "new_tokens": max_new,
            "reference": "generate(do_sample=False), one prompt at a time",
            "graphs": {},
        }
        for variant, g in graphs.items():
            example = arch.example_inputs(config, 1, 1, 0, seed=0, variant=variant)
            decoder = GraphDecoder(g["signature"], {k: v.shape for k, v in example.items()})
            tokens = decoder.generate(g["onnx"], prompts, max_new, pad_id)
            entry: dict[str, Any] = greedy_agreement(tokens, expected)
            if not fp16:
                require_identical_greedy(
                    tokens, expected, f"graph {variant!r}", "ONNX", "transformers generate"
                )
            if fp16:
                with torch.no_grad():
                    entry.update(self._top1(decoder, g, model, prompts, expected, pad_id, variant))
            report["graphs"][variant] = entry
        return report

    @staticmethod
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

    @staticmethod
    def _top1(decoder, g, model, prompts, continuation, pad_id: int, variant: str) -> dict:
        """Teacher-forced top-1 agreement of an fp16 graph with transformers over the rows."""
        import torch

        rows = [list(p) + continuation[i].tolist() for i, p in enumerate(prompts)]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
        got = decoder.prefill_logits(g["onnx"], ids, mask).argmax(-1)
        agree, total = 0, 0
        for i, r in enumerate(rows):
            ref = model(torch.tensor([r])).logits[0].argmax(-1).numpy()
            agree += int((got[i, width - len(r) :] == ref).sum())
            total += len(r)
        top1 = agree / total
        if top1 < FP16_MIN_TOP1:
            raise AgreementTooLow(
                f"graph {variant!r} (fp16): teacher-forced top-1 agreement with transformers "
                f"{top1:.2%} is below {FP16_MIN_TOP1:.0%}; export in fp32"
            )
        return {"teacher_forced_steps": total, "top1_agreement": top1}

    # -- classify -----------------------------------------------------------------------------
    def _check_classify(self, arch, config, artifacts_dir: Path, graphs, fp16: bool) -> dict:
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        from engine.runtime.batched_engines import TYPE_IDS, encode_texts, prepare_tokenizer

        serving = arch.serving_metadata(config, artifacts_dir)
        max_length, pad_id = int(serving["max_length"]), int(serving["pad_token_id"])
        cls_id = serving.get("cls_token_id")
        tokenizer = Tokenizer.from_file(str(artifacts_dir / serving["tokenizer"]))
        prepare_tokenizer(tokenizer, max_length, cls_id)
        texts = texts_64()
        theirs = AutoTokenizer.from_pretrained(str(self.path))
        want = theirs(texts, truncation=True, max_length=max_length)["input_ids"]
        enc = encode_texts(tokenizer, texts, pad_id, cls_id)
        mine = [r[m == 1].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
        if mine != want:
            bad = next(i for i, (a, b) in enumerate(zip(mine, want)) if a != b)
            raise LabelMismatch(
                f"the runtime tokenizes {texts[bad][:40]!r} as {mine[bad][:12]}..., "
                f"transformers' AutoTokenizer as {want[bad][:12]}..."
            )
        model = self.model()
        expected = []
        with torch.no_grad():
            for ids in want:  # each text alone: no padding in the reference
                x = torch.tensor([ids])
                expected.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0])
        ref = torch.stack(expected).double().numpy()
        report: dict[str, Any] = {
            "texts": len(texts),
            "tokenization": "identical to AutoTokenizer(truncation=True)",
            "max_length": max_length,
            "graphs": {},
        }
        for variant, g in graphs.items():
            takes_types = TYPE_IDS in g["signature"].input_names()
            got, widths = [], []
            for b, extra in enumerate(PAD_EXTRA):
                feeds = encode_texts(
                    tokenizer, texts[b * 16 : (b + 1) * 16], pad_id, cls_id, takes_types
                )
                width = feeds["input_ids"].shape[1]
                target = max_length if extra is None else min(max_length, width + extra)
                fill = {"input_ids": pad_id}  # masks and segment ids pad with 0
                feeds = {
                    k: np.pad(v, ((0, 0), (0, target - width)), constant_values=fill.get(k, 0))
                    for k, v in feeds.items()
                }
                widths.append(target)
                got.append(g["onnx"](feeds)[g["signature"].output_names()[0]])
            logits = np.concatenate(got).astype(np.float64)
            diff = float(np.abs(logits - ref).max())
            agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
            report["graphs"][variant] = {
                "padded_widths": widths,
                "max_abs_logit_diff": diff,
                "argmax_agreement": agree,
            }
            if not fp16 and agree < 1.0:
                raise LabelMismatch(
                    f"graph {variant!r}: argmax differs from transformers on "
                    f"{int(round((1 - agree) * len(texts)))} of {len(texts)} texts"
                )
            if not fp16 and diff > CLASSIFY_ATOL:
                raise ValuesMismatch(
                    f"graph {variant!r}: logits differ from transformers by up to {diff:.3g} "
                    f"(> {CLASSIFY_ATOL:g}) over {len(texts)} padded texts"
                )
            if fp16 and agree < FP16_MIN_LABEL_AGREEMENT:
                raise AgreementTooLow(
                    f"graph {variant!r} (fp16): argmax agreement with transformers {agree:.1%} "
                    f"is below {FP16_MIN_LABEL_AGREEMENT:.1%}; export in fp32"
                )
        return report
