"""The engine's own CPU time per step, with the model's graph taken out of the loop.

Every decode step of ``LLMEngine`` is the graph plus the engine's Python: scheduling, the
runner's block tables and pool writes, sampling, detokenizing and building outputs. This runs
greedy requests through the real engine with its backend's ``run`` replaced by a stub that
returns the first outputs it saw for each input shape (real shapes, reused values), so what is
timed is the engine alone; the graph's own cost is what ``bench/kv_layouts.py`` times.

    python bench/step_overhead.py --repo REPO --model lm [--batches 1 16] [--repeats 5]

Run it with another checkout first on ``PYTHONPATH`` to compare engine versions on their own
exports (the engine API used here has not changed since the dense KV cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np


def stub_backend(runner) -> None:
    """Replace ``runner.backend.run`` by a cache of its first result per input shape."""
    run, seen = runner.backend.run, {}

    def cached(feeds, *args, **kwargs):
        key = (feeds["input_ids"].shape, kwargs.get("binding_key"))
        if key not in seen:
            seen[key] = run(feeds, *args, **kwargs)
        return seen[key]

    runner.backend.run = cached


def per_step(engine, prompts: list[list[int]], new: int) -> float:
    """CPU seconds per engine step to run ``prompts`` to ``new`` greedy tokens each."""
    from engine.runtime import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    steps, c0 = 0, time.process_time()
    while engine.has_unfinished:
        engine.step()
        steps += 1
    return (time.process_time() - c0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--model", default="lm")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import engine as package
    from engine.runtime import EngineConfig, LLMEngine

    config = EngineConfig(max_num_seqs=max(args.batches), max_model_len=args.prompt_len + args.new)
    engine = LLMEngine.from_repository(args.repo, args.model, threads=1, spin=False, config=config)
    stub_backend(engine.runner)
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, engine.vocab_size, (max(args.batches), args.prompt_len)).tolist()
    print(f"# engine {Path(package.__file__).parent}, load avg {os.getloadavg()[0]:.1f}")
    print(f"# CPU us per step without the graph: median (min-max) of {args.repeats} runs")
    for batch in args.batches:
        per_step(engine, prompts[:batch], args.new)  # warm: every shape's result is cached
        times = [1e6 * per_step(engine, prompts[:batch], args.new) for _ in range(args.repeats)]
        print(
            f"batch {batch:2d}: {statistics.median(times):.0f} "
            f"({min(times):.0f}-{max(times):.0f}) us per step"
        )


if __name__ == "__main__":
    main()
