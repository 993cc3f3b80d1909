"""Candidate KV-cache layouts for the decode graph, timed interleaved in one process.

Each candidate is the default decoder-lm shape (4 layers, width 256, 4 heads, vocab 8192,
random weights) exported with the dynamo exporter and run by onnxruntime on the CPU:

- ``dense``: the pre-paging ``kv_inplace`` graph: a contiguous (B, H, W, D) cache window per
  sequence, read in place. Memory cannot follow use (every row is as long as the longest).
- ``gather``: a paged pool (blocks, H, 16, D) and block tables; the live blocks are gathered
  into a dense (B, H, W, D) cache in the graph, then attended as ``dense``.
- ``gather-blockwise``: the same gather, but scores are computed per block without the
  transpose back to (B, H, W, D).
- ``paged``: what ``kv_inplace`` is now (plugins/decoder_lm/model.py ``forward_paged``): each
  pool block is scored against its owning row's queries where it lies, no gather.

Every candidate gets the same cache contents and must give the same logits as ``dense``. Time is
process CPU time per step with one intra-op thread (less sensitive to other jobs on a shared
host than wall time), median of many short interleaved rounds.

    python bench/kv_layouts.py [--reps 200] [--candidates dense,gather,paged]
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.paged_inputs import PAGED_INPUTS, paged_inputs

BS = 16  # tokens per block
UNPAGED = ("new_mask", "lens", "table", "owner", "index")  # the other candidates' inputs
PAGED = ("causal_mask", "table", "block_mask", "block_rows", "block_slots", "block_weights")
CASES = ((1, 96), (16, 64), (16, 112), (16, 160))  # (batch, cached tokens per row)
STEPS_PER_ROUND = 10


def build(candidate: str, path: Path, context: int = 192) -> None:
    """Export one candidate's decode graph to ``path``."""
    import torch
    from torch.export import Dim

    from exporters.onnx_graph import optimize
    from plugins.decoder_lm.model import GPT, GPTConfig, _causal, _masked_softmax

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=context)
    model = GPT(cfg).eval()
    H, D, L = cfg.n_head, cfg.head_dim, cfg.n_layer

    def gathered(att, x, pk, pv, table, lens, new_allowed, blockwise: bool):
        q, k, v = att._qkv(x)
        B, _, S, _ = q.shape
        nb = table.shape[1]
        W = nb * BS
        allowed_c = (torch.arange(W)[None, :] < lens[:, None])[:, None, None, :]
        allowed = torch.cat([allowed_c.expand(-1, -1, S, -1), new_allowed], -1)
        if not blockwise:
            K = pk[table].permute(0, 2, 1, 3, 4).reshape(B, H, W, D)
            V = pv[table].permute(0, 2, 1, 3, 4).reshape(B, H, W, D)
            p = _masked_softmax(
                torch.cat([q @ K.transpose(-2, -1), q @ k.transpose(-2, -1)], -1), allowed
            )
            return att._out(p[..., :W] @ V + p[..., W:] @ v), (k, v)
        K, V = pk[table], pv[table]  # (B, nb, H, bs, D)
        sc = (q[:, None] @ K.transpose(-2, -1)).permute(0, 2, 3, 1, 4).reshape(B, H, S, W)
        p = _masked_softmax(torch.cat([sc, q @ k.transpose(-2, -1)], -1), allowed)
        pb = p[..., :W].reshape(B, H, S, nb, BS).permute(0, 3, 1, 2, 4)
        return att._out((pb @ V).sum(1) + p[..., W:] @ v), (k, v)

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def run(self, ids, pos, *rest):
            m, S = self.m, ids.shape[1]
            if candidate == "paged":  # the runtime's inputs (engine/paged_inputs.py)
                pools = list(zip(rest[6::2], rest[7::2]))
                logits, new = m.forward_paged(ids, pos, *rest[:6], pools)
                return (logits, *(t for kv in new for t in kv))
            new_mask, lens, table, owner, index, *cache = rest
            new_allowed = _causal(S, S, ids.device)[None, None] & (new_mask[:, None, None, :] != 0)
            x, outs = m._embed(ids, pos), []
            for i, blk in enumerate(m.transformer.h):
                h = blk.ln_1(x)
                if candidate == "dense":
                    W = cache[0].shape[2]
                    allowed_c = (torch.arange(W)[None, :] < lens[:, None])[:, None, None, :]
                    q, k, v = blk.attn._qkv(h)
                    ck, cv = cache[2 * i], cache[2 * i + 1]
                    p = _masked_softmax(
                        torch.cat([q @ ck.transpose(-2, -1), q @ k.transpose(-2, -1)], -1),
                        torch.cat([allowed_c.expand(-1, -1, S, -1), new_allowed], -1),
                    )
                    y = blk.attn._out(p[..., :W] @ cv + p[..., W:] @ v)
                else:
                    y, (k, v) = gathered(
                        blk.attn, h, cache[2 * i], cache[2 * i + 1], table, lens, new_allowed,
                        candidate == "gather-blockwise",
                    )  # fmt: skip
                x = x + y
                x = x + blk.mlp(blk.ln_2(x))
                outs += [k, v]
            return (m._head(x), *outs)

    names = ["ids", "pos", *(PAGED if candidate == "paged" else UNPAGED)]
    names += [f"c{i}" for i in range(2 * L)]
    P = inspect.Parameter
    forward = lambda self, *a: self.run(*a)  # noqa: E731
    forward.__signature__ = inspect.Signature(
        [P(n, P.POSITIONAL_OR_KEYWORD) for n in ["self", *names]]
    )
    graph = type("G", (Graph,), {"forward": forward})().eval()
    b, s, nb, pool = Dim("batch"), Dim("seq"), Dim("nb"), Dim("pool")
    B, S, NB, NP = 2, 3, 2, 7
    args = [
        torch.randint(4, 8000, (B, S)),
        torch.arange(S).expand(B, S).contiguous() + 5,
        torch.ones(B, S, dtype=torch.int64),
        torch.tensor([20, 9]),
        torch.tensor([[0, 3], [5, 1]]),
        torch.tensor([0, 1, -1, 0, -1, 1, -1]),
        torch.tensor([0, 1, 0, 1, 0, 0, 0]),
    ]
    dims = [{0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: b}, {0: b, 1: nb}, {0: pool}, {0: pool}]
    if candidate == "paged":
        paged = paged_inputs(*(a.numpy() for a in args[2:]), BS)
        args[2:] = [torch.from_numpy(paged[n]) for n in PAGED_INPUTS]
        dims[2:] = [{0: b, 1: s, 2: s}, {0: b, 1: nb}, {0: b, 1: nb}, {0: pool}, {0: pool}]
        dims.append({0: b, 1: pool})
    if candidate == "dense":
        args += [torch.randn(B, H, NB * BS, D) for _ in range(2 * L)]
        dims += [{0: b, 2: nb * BS}] * (2 * L)
    else:
        args += [torch.randn(NP, H, BS, D) for _ in range(2 * L)]
        dims += [{0: pool}] * (2 * L)
    with torch.no_grad():
        torch.onnx.export(
            graph, tuple(args), str(path), dynamo=True, external_data=False, opset_version=20,
            input_names=names, dynamic_shapes=tuple(dims), optimize=True, verbose=False,
        )  # fmt: skip
    optimize(path)


def feeds(candidate: str, batch: int, cached: int, rng, pool_extra: int = 0) -> dict:
    """Inputs of one decode step: every row has ``cached`` tokens, in shuffled pool blocks."""
    nb = cached // BS
    f = {
        "ids": rng.integers(4, 8000, (batch, 1)),
        "pos": np.full((batch, 1), cached),
        "new_mask": np.ones((batch, 1), np.int64),
        "lens": np.full(batch, cached),
    }
    pool = batch * nb + pool_extra
    table = rng.permutation(pool)[: batch * nb].reshape(batch, nb)
    owner, index = np.full(pool, -1), np.zeros(pool, np.int64)
    owner[table], index[table] = np.arange(batch)[:, None], np.arange(nb)[None, :]
    f.update(table=table, owner=owner, index=index)
    paged = paged_inputs(f["new_mask"], f["lens"], table, owner, index, BS)
    f.update((PAGED[i], paged[n]) for i, n in enumerate(PAGED_INPUTS))
    for i in range(8):
        blocks = rng.standard_normal((pool, 4, BS, 64)).astype(np.float32)
        if candidate == "dense":  # the same contents, laid out densely per row
            f[f"c{i}"] = blocks[table].transpose(0, 2, 1, 3, 4).reshape(batch, 4, nb * BS, 64)
        else:
            f[f"c{i}"] = blocks
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="dense,gather,gather-blockwise,paged")
    ap.add_argument("--reps", type=int, default=200, help="decode steps per case and candidate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, help="keep the graphs here (reused when present)")
    args = ap.parse_args()
    import onnxruntime as ort

    names = args.candidates.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="kv-layouts-"))
    work.mkdir(parents=True, exist_ok=True)
    sessions = {}
    for name in names:
        if not (work / f"{name}.onnx").exists():
            build(name, work / f"{name}.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        so.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(work / f"{name}.onnx"), so)
    print(f"# load avg {os.getloadavg()[0]:.1f}; CPU ms per decode step, {args.threads} thread(s)")
    rounds = args.reps // STEPS_PER_ROUND
    print(
        f"# median (min-max) of {rounds} interleaved rounds of {STEPS_PER_ROUND} steps; x = / dense"
    )
    wanted = {n: {i.name for i in s.get_inputs()} for n, s in sessions.items()}
    for batch, cached in CASES:
        same = {}
        for n in names:  # the same seed: the same cache contents for every candidate
            f = feeds(n, batch, cached, np.random.default_rng(batch + cached))
            same[n] = {k: v for k, v in f.items() if k in wanted[n]}
        rounds = args.reps // STEPS_PER_ROUND
        compare_interleaved(sessions, same, rounds, STEPS_PER_ROUND, batch, cached)


def compare_interleaved(
    sessions: dict, feeds: dict, rounds: int, steps: int, batch: int, cached: int
) -> dict[str, list[float]]:
    """Check every session gives the first one's logits on its ``feeds``, then time them in
    ``rounds`` interleaved rounds of ``steps`` runs (drift hits all alike); print one line of
    CPU ms per run, median (min-max) and / the first, and return the rounds' times."""
    names = list(sessions)
    ref = sessions[names[0]].run(None, feeds[names[0]])[0]
    for n in names[1:]:
        diff = float(np.abs(sessions[n].run(None, feeds[n])[0] - ref).max())
        assert diff < 1e-3, f"{n} disagrees with {names[0]}: {diff} (the same weights?)"
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            t0 = time.process_time()
            for _ in range(steps):
                sessions[n].run(None, feeds[n])
            times[n].append((time.process_time() - t0) / steps * 1e3)
    base = statistics.median(times[names[0]])
    cells = [
        f"{n} {statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) "
        f"x{statistics.median(t) / base:.3f}"
        for n, t in times.items()
    ]
    print(f"batch {batch:2d}, {cached:3d} cached: " + " | ".join(cells), flush=True)
    return times


if __name__ == "__main__":
    main()
