"""The runtime against the bare decode loop, side by side in one process on the same model.

For each batch size: the bare loop (bench/bare_loop.py: default graph, past+present
concatenated every step, no scheduler) and the engine (kv_inplace graph, preallocated KV,
IOBinding, scheduler + sampler + detokenizer), greedy, ``--new`` tokens after ``--prompt-len``
token prompts, runs interleaved ``--repeats`` times; the median of each is reported. Batch >1
engine runs go through the async API: that many concurrent ``engine.generate`` streams.

    python bench/runtime_bench.py --repo REPO --model lm [--build]   # --build makes REPO first

``--build`` trains the default decoder-lm shape for one step (random-ish weights; speed does
not depend on them) with ``block_size=192`` (``--context``) so 32 + 128 tokens fit, and
exports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_loop import greedy, load_session  # noqa: E402


def build_repo(repo: Path, model: str, context: int) -> None:
    """Train one step of the default decoder-lm with a longer context and export it."""
    from engine.trainer import train
    from exporters.base import ExportOptions
    from exporters.onnx_format import OnnxFormat

    ckpt = repo.parent / f"{model}-ckpt"
    overrides = {"block_size": context, "eval_windows": 8}
    train("decoder-lm", ckpt, steps=1, overrides=overrides, progress=False)
    OnnxFormat().export(ckpt, repo, ExportOptions(name=model, progress=False, force=True))


def bare_run(session, prompts: list[list[int]], new: int) -> tuple[float, float, np.ndarray]:
    """(seconds to the first token, seconds in all, tokens) of one bare-loop generation."""
    t0 = time.perf_counter()
    greedy(session, prompts, 1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = greedy(session, prompts, new)
    return first, time.perf_counter() - t0, tokens


def cpu_timed(run, *args) -> tuple[float, tuple]:
    """(process CPU seconds, result) of ``run(*args)``: every thread of this process counted.

    CPU time barely moves when other jobs share the host, where wall time drifts up to 2x: the
    figure to compare variants by on a busy machine (with ``--threads 1 --no-spin``, so idle
    onnxruntime threads burn nothing).
    """
    c0 = time.process_time()
    result = run(*args)
    return time.process_time() - c0, result


def engine_run(engine, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    """(seconds to the first token, seconds in all, tokens) through the async API."""
    from engine.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    first: list[float] = []

    async def one(prompt: list[int], t0: float) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(prompt, params):
            if not tokens:
                first.append(time.perf_counter() - t0)
            tokens = out.token_ids
        return tokens

    async def run_all() -> list[list[int]]:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(p, t0) for p in prompts))

    t0 = time.perf_counter()
    tokens = asyncio.run(run_all())
    return max(first), time.perf_counter() - t0, tokens


def summarize(batch: int, new: int, runs: list[tuple[float, float, float]]) -> dict[str, float]:
    """Median and best tokens/s, decode time per output token (first token excluded) and
    process CPU time per output token, from (first, total, cpu) seconds per run."""
    rates = [batch * new / total for _, total, _ in runs]
    tpots = [1e3 * (total - first) / (new - 1) for first, total, _ in runs]
    cpus = [1e3 * cpu / (batch * new) for _, _, cpu in runs]
    return {
        "tok_s": statistics.median(rates),
        "tok_s_best": max(rates),
        "tpot_ms": statistics.median(tpots),
        "tpot_ms_best": min(tpots),
        "cpu_ms_per_token": statistics.median(cpus),
        "cpu_ms_per_token_best": min(cpus),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--model", default="lm")
    ap.add_argument("--build", action="store_true", help="train + export the model first")
    ap.add_argument("--context", type=int, default=192, help="--build: the model's context")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-spin", action="store_true", help="onnxruntime threads do not spin")
    ap.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="the engine recomputes every prompt (repeats send the same prompts: with caching, "
        "later repeats skip most of their prefill)",
    )
    ap.add_argument(
        "--spread",
        type=int,
        metavar="SHORTEST",
        help="prompts of lengths spread evenly from --prompt-len down to SHORTEST across a batch "
        "(the dense cache pads every row to the longest, the paged one does not)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.build:
        build_repo(args.repo, args.model, context=args.context)

    from engine.repository import read_manifest, version_dir
    from engine.runtime import EngineConfig, LLMEngine

    spin = not args.no_spin
    path = version_dir(args.repo, args.model)
    manifest = read_manifest(path)
    serving = manifest.serving
    session = load_session(path / manifest.graph("default")["file"], args.threads, spin)
    config = EngineConfig(
        max_num_seqs=max(args.batches),
        max_model_len=args.prompt_len + args.new,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    engine = LLMEngine.from_repository(
        args.repo, args.model, threads=args.threads, config=config, spin=spin
    )
    rng = np.random.default_rng(0)
    vocab = serving["vocab_size"]

    def batch_prompts(batch: int) -> list[list[int]]:
        lens = [args.prompt_len] * batch
        if args.spread:
            lens = np.linspace(args.prompt_len, args.spread, batch).round().astype(int).tolist()
        return [rng.integers(4, vocab, n).tolist() for n in lens]

    prompts = {batch: batch_prompts(batch) for batch in args.batches}
    bare_run(session, prompts[args.batches[0]][:2], 4)  # warm both up
    engine_run(engine, prompts[args.batches[0]][:2], 4)

    shape = {k: serving[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}")
    print(f"# model {args.repo}/{args.model}: {shape}, context {serving['context_length']}")
    print(
        f"# {args.prompt_len}-token prompts"
        + (f" (down to {args.spread} across a batch)" if args.spread else "")
        + f", {args.new} greedy tokens, {args.threads} threads, "
        f"spin {'on' if spin else 'off'}; {args.repeats} interleaved runs each: median (best)"
    )
    header = (
        "batch",
        "bare tok/s",
        "engine tok/s",
        "ratio",
        "bare TPOT ms",
        "engine TPOT",
        "ratio",
        "bare CPU ms/tok",
        "engine CPU",
        "ratio",
    )
    row = "{:>5} {:>16} {:>16} {:>11} {:>15} {:>15} {:>11} {:>15} {:>15} {:>11}"
    print((row + " same").format(*header))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    for batch in args.batches:
        bare, eng, same = [], [], True
        for _ in range(args.repeats):
            # each side's onnxruntime threads spin a while after a run: let them park first
            time.sleep(0.3)
            b_cpu, (b_first, b_all, b_tokens) = cpu_timed(
                bare_run, session, prompts[batch], args.new
            )
            time.sleep(0.3)
            e_cpu, (e_first, e_all, e_tokens) = cpu_timed(
                engine_run, engine, prompts[batch], args.new
            )
            same &= b_tokens.tolist() == e_tokens
            bare.append((b_first, b_all, b_cpu))
            eng.append((e_first, e_all, e_cpu))
        b, e = summarize(batch, args.new, bare), summarize(batch, args.new, eng)
        report["rows"].append({"batch": batch, "bare": b, "engine": e, "same_tokens": same})

        def pair(a: float, best: float, fmt: str) -> str:
            return f"{a:{fmt}} ({best:{fmt}})"

        cells = [
            pair(b["tok_s"], b["tok_s_best"], ",.0f"),
            pair(e["tok_s"], e["tok_s_best"], ",.0f"),
            pair(e["tok_s"] / b["tok_s"], e["tok_s_best"] / b["tok_s_best"], ".2f"),
            pair(b["tpot_ms"], b["tpot_ms_best"], ".2f"),
            pair(e["tpot_ms"], e["tpot_ms_best"], ".2f"),
            pair(e["tpot_ms"] / b["tpot_ms"], e["tpot_ms_best"] / b["tpot_ms_best"], ".2f"),
            pair(b["cpu_ms_per_token"], b["cpu_ms_per_token_best"], ".3f"),
            pair(e["cpu_ms_per_token"], e["cpu_ms_per_token_best"], ".3f"),
            pair(
                e["cpu_ms_per_token"] / b["cpu_ms_per_token"],
                e["cpu_ms_per_token_best"] / b["cpu_ms_per_token_best"],
                ".2f",
            ),
        ]
        print((row + " {}").format(batch, *cells, same))
    d = engine.describe()
    report["kv"] = d
    if "kv_blocks" in d:  # an engine from before paged KV (run for a before/after) has none
        print(
            f"# KV pool {d['kv_cache_bytes'] / 2**20:.2f} MiB preallocated ({d['kv_blocks']} "
            f"blocks x {d['kv_block_size']} tokens) = the budget; peak in use "
            f"{d['kv_peak_bytes'] / 2**20:.2f} MiB; preemptions {d['preemptions']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
