"""Which quantization for CPUs: accuracy, batch invariance, file size and speed, in one process.

From one fp32 decoder-lm version, writes a variant per scheme next to it (both graphs
quantized the same way) and measures each against the fp32 graphs:

* accuracy on the decoder's held-out windows (``Architecture.heldout_examples``): teacher-forced
  top-1 agreement with fp32 and the cross-entropy increase, through the ``default`` graph;
* batch invariance: greedy tokens of each prompt alone and inside a batch of 16 (engine);
* file size of ``kv_inplace.onnx`` (what the runtime serves);
* speed: the engine in process (``LLMEngine.generate``, as ``engine serve`` runs it), 1 stream and
  16 concurrent streams, variants interleaved in shuffled order every round, one engine alive at
  a time (sessions with their own spinning thread pools slow each other down), median of rounds.

    python bench/quant_bench.py --repo REPO --model lm --rounds 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from engine.graph_decoder import GraphDecoder
from exporters.quantize import QuantScheme, quantize_graph
from exporters.validate_quantized import log_softmax


def dynamic_int8(path: Path) -> dict[str, Any]:
    """onnxruntime's ``quantize_dynamic``, QInt8 weights, per-tensor activation scales."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".q.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    os.replace(out, path)
    return {"method": "quantize_dynamic QInt8"}


SCHEMES: dict[str, Callable[[Path], dict[str, Any]] | None] = {
    "fp32": None,
    "int8-b32": lambda p: quantize_graph(p, QuantScheme(block_size=32)),
    "int8-b128": lambda p: quantize_graph(p, QuantScheme(block_size=128)),
    "int8-b32-nogather": lambda p: quantize_graph(p, QuantScheme(min_gather_rows=10**9)),
    "int4-b32": lambda p: quantize_graph(p, QuantScheme(bits=4, block_size=32)),
    "dynamic-int8": dynamic_int8,
}


def make_variant(repo: Path, model: str, name: str) -> str:
    """Copy ``model``'s latest version as model ``model-name`` and quantize its graphs."""
    from engine.repository import read_manifest, version_dir, write_manifest

    if SCHEMES[name] is None:
        return model
    src = version_dir(repo, model)
    target = f"{model}-{name}"
    dest = repo / target / "1"
    if not (dest / "manifest.json").exists():
        shutil.rmtree(repo / target, ignore_errors=True)
        shutil.copytree(src, dest)
        manifest = read_manifest(dest)
        for graph in manifest.graphs.values():
            graph["quantization"] = SCHEMES[name](dest / graph["file"])
        manifest.name, manifest.version, manifest.precision = target, 1, name
        write_manifest(dest, manifest)
    return target


def heldout(repo: Path, model: str) -> tuple[np.ndarray, np.ndarray, Any, GraphDecoder]:
    """The decoder's held-out windows and targets, the fp32 manifest, a default-graph driver."""
    from engine.plugins import get_architecture
    from engine.repository import read_manifest, version_dir

    path = version_dir(repo, model)
    manifest = read_manifest(path)
    arch = get_architecture(manifest.architecture)[0]
    config = arch.config_class(**manifest.checkpoint["config"])
    feeds, targets = arch.heldout_examples(config, path)
    shapes = {k: v.shape for k, v in arch.example_inputs(config, 1, 1, 0).items()}
    decoder = GraphDecoder(arch.export_signature(config, "default"), shapes)
    return feeds["input_ids"], targets, manifest, decoder


def session_runner(repo: Path, name: str) -> Callable[[dict], dict]:
    """The default graph of model ``name`` on one thread, as a runner."""
    import onnxruntime as ort

    from engine.repository import version_dir

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir(repo, name) / "model.onnx"), so)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(feeds: dict) -> dict:
        return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))

    return run


def accuracy(
    repo: Path, model: str, variant: str, data: tuple[np.ndarray, np.ndarray, GraphDecoder]
) -> dict[str, float]:
    """Top-1 agreement and CE increase of ``variant``'s default graph against fp32's."""
    ids, targets, decoder = data
    ref_run, run = session_runner(repo, model), session_runner(repo, variant)
    mask = np.ones_like(ids)
    agree = nll_ref = nll = 0.0
    for start in range(0, len(ids), 8):
        rows = slice(start, start + 8)
        ref = log_softmax(decoder.prefill_logits(ref_run, ids[rows], mask[rows]))
        got = log_softmax(decoder.prefill_logits(run, ids[rows], mask[rows]))
        t = targets[rows][..., None]
        agree += float((ref.argmax(-1) == got.argmax(-1)).sum())
        nll_ref -= float(np.take_along_axis(ref, t, -1).sum())
        nll -= float(np.take_along_axis(got, t, -1).sum())
    n = ids.size
    return {"top1_agreement": agree / n, "ce_increase": (nll - nll_ref) / n}


def open_engine(repo: Path, name: str, threads: int, streams: int, context: int):
    from engine.runtime import EngineConfig, LLMEngine

    config = EngineConfig(max_num_seqs=streams, max_model_len=context)
    return LLMEngine.from_repository(repo, name, threads=threads, config=config)


def generate(engine, prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """Seconds for all ``prompts`` as concurrent streams, and their greedy tokens."""
    from engine.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)

    async def one(prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, params):
            tokens = out.token_ids
        return tokens

    async def run_all() -> list[list[int]]:
        return await asyncio.gather(*(one(p) for p in prompts))

    t0 = time.perf_counter()
    tokens = asyncio.run(run_all())
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--model", default="lm")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single-prompts", type=int, default=4, help="1-stream requests per round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from bench.prompts import load_tokenizer, text_prompts

    names = [s for s in args.schemes.split(",") if s]
    ids, targets, manifest, decoder = heldout(args.repo, args.model)
    variants = {s: make_variant(args.repo, args.model, s) for s in names}
    tokenizer = load_tokenizer(args.repo / args.model / str(manifest.version), manifest.serving)
    fraction = manifest.checkpoint.get("config", {}).get("heldout_fraction", 0.1)
    prompts = text_prompts(tokenizer, args.input_len, 16, seed=0, fraction=fraction).token_ids
    context = args.input_len + args.output_len
    results: dict[str, dict[str, Any]] = {}
    for scheme, name in variants.items():
        kv = args.repo / name / "1" / "kv_inplace.onnx"
        entry = {"model": name, "kv_inplace_bytes": kv.stat().st_size}
        entry.update(accuracy(args.repo, args.model, name, (ids, targets, decoder)))
        engine = open_engine(args.repo, name, args.threads, 16, context)
        alone = [generate(engine, [p], args.output_len)[1][0] for p in prompts]
        batched = generate(engine, prompts, args.output_len)[1]
        entry["same_alone_and_in_16"] = sum(a == b for a, b in zip(alone, batched))
        entry["tokens"] = batched
        engine.close()
        results[scheme] = entry
        print(scheme, {k: v for k, v in entry.items() if k != "tokens"}, flush=True)
    fp32 = results.get("fp32", {}).get("tokens")
    for entry in results.values():
        tokens = entry.pop("tokens")
        if fp32 is not None:
            entry["greedy_tokens_equal_fp32"] = float(np.mean(np.array(tokens) == np.array(fp32)))
    speed: dict[str, dict[int, list[float]]] = {s: {1: [], 16: []} for s in variants}
    order = list(variants)
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        random.Random(round_).shuffle(order)
        for scheme in order:
            engine = open_engine(args.repo, variants[scheme], args.threads, 16, context)
            generate(engine, prompts[:2], 8)  # warm-up
            single = prompts[: args.single_prompts]
            seconds = sum(generate(engine, [p], args.output_len)[0] for p in single)
            speed[scheme][1].append(len(single) * args.output_len / seconds)
            seconds = generate(engine, prompts, args.output_len)[0]
            speed[scheme][16].append(16 * args.output_len / seconds)
            engine.close()
        load.append(os.getloadavg()[0])
        print(f"round {round_ + 1}: load {load[-1]:.1f}", flush=True)
    print(f"\n# load average during the run: {min(load):.1f}-{max(load):.1f}")
    header = "| scheme | kv_inplace MB | top-1 vs fp32 | CE +nats | alone = in 16 |"
    print(header + " tok/s 1 stream (range) | tok/s 16 streams (range) |")
    print("|---" * 7 + "|")
    for scheme, entry in results.items():
        cells = []
        for streams in (1, 16):
            runs = speed[scheme][streams]
            entry[f"tok_s_{streams}"] = runs
            if not runs:  # --rounds 0: accuracy, size and batch invariance only
                cells.append("-")
                continue
            cells.append(f"{statistics.median(runs):,.0f} ({min(runs):,.0f}-{max(runs):,.0f})")
        print(
            f"| {scheme} | {entry['kv_inplace_bytes'] / 1e6:.1f} | {entry['top1_agreement']:.4f} "
            f"| {entry['ce_increase']:+.4f} | {entry['same_alone_and_in_16']}/16 | "
            + " | ".join(cells)
            + " |"
        )
    if args.json:
        report = {"args": vars(args), "load": load, "results": results}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
