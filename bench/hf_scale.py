"""GPT-2-small at full size, offline: build it, and measure export and serving memory.

``build`` writes a Hugging Face ``GPT2LMHeadModel`` directory of GPT-2 small's shape (12 layers,
768 wide, 12 heads, context 1024, vocabulary 50257: 124M parameters) from a config with a
fixed seed, and a byte-level BPE tokenizer of 50257 tokens trained on the Python standard
library (``<|endoftext|>`` last, id 50256, as in GPT-2). Nothing is downloaded. Random-init
weights at GPT-2's 0.02 std give nearly uniform logits, where greedy decoding sits on
near-ties; the token and position embeddings are redrawn larger (0.1 and 0.5 std) so greedy
text has margins that fp32 rounding does not flip, and the residual projections are left as
GPT-2 initialises them so activations stay in fp16's range.

``export`` runs ``engine export`` under ``/usr/bin/time -v`` and reports its peak RSS and
wall time. ``serve`` starts ``engine serve`` with a KV budget, drives 16 concurrent streams
through it and reports the server's resident memory (VmRSS, and VmHWM, its peak).

    python bench/hf_scale.py build /tmp/gpt2-small
    python bench/hf_scale.py export /tmp/gpt2-small --repo /tmp/gpt2-repo [--fp16 | --int8]
    python bench/hf_scale.py serve --repo /tmp/gpt2-repo --model gpt2-small \\
        --kv-cache-bytes 301989888 --max-model-len 256
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}
VOCAB = 50257
EOT = "<|endoftext|>"
EMBED_STD = {"wte": 0.1, "wpe": 0.5}


def train_tokenizer(vocab_size: int):
    """Byte-level BPE on the stdlib's source, end-of-text appended last (GPT-2's id layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from plugins.stdlib_text import read_text, stdlib_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in stdlib_files()), trainer=trainer)
    tok.add_special_tokens([EOT])
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"the stdlib gave {tok.get_vocab_size()} tokens, not {vocab_size}")
    return tok


def build(out: Path, seed: int, vocab_size: int, shape: dict) -> None:
    """Write the Hugging Face directory (weights, config.json, tokenizer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = train_tokenizer(vocab_size)
    eot = tok.token_to_id(EOT)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, bos_token_id=eot, eos_token_id=eot, **shape)
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, std in EMBED_STD.items():
            weight = getattr(model.transformer, name).weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * std)
    model.save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT,
        model_max_length=shape["n_positions"],
    )  # fmt: skip
    fast.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"path": str(out), "parameters": params, "vocab": vocab_size, **shape}))


def peak_rss(args: list[str]) -> dict:
    """Run ``args`` under ``/usr/bin/time -v``; return its exit code, peak RSS and wall time."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{tail}")
    return {
        "command": " ".join(args),
        "peak_rss_mib": round(int(found.group(1)) / 1024, 1) if found else None,
        "wall_s": round(wall, 1),
    }


def export(hf_dir: Path, repo: Path, name: str, precision: list[str]) -> None:
    """``engine export`` under /usr/bin/time -v; prints its peak RSS and the files' sizes."""
    args = [sys.executable, "-m", "engine", "export", str(hf_dir), "--repo", str(repo)]
    args += ["--name", name, "--no-progress", *precision]
    report = peak_rss(args)
    from engine.repository import versions

    version = Path(repo) / name / str(versions(Path(repo), name)[-1])
    files = {p.name: p.stat().st_size for p in sorted(version.iterdir()) if p.is_file()}
    print(json.dumps({**report, "version": str(version), "file_bytes": files}))


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def serve(
    repo: Path, model: str, kv_bytes: int, max_len: int, streams: int, tokens: int, port: int
) -> None:
    """Start engine serve, run ``streams`` concurrent generations, report its memory."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.client import EngineClient

    args = [sys.executable, "-m", "engine", "serve", "--repo", str(repo), "--models", model]
    args += ["--port", str(port), "--no-metrics", "--max-num-seqs", str(streams)]
    args += ["--kv-cache-bytes", str(kv_bytes), "--max-model-len", str(max_len)]
    args += ["--log-level", "WARNING"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        loaded = _wait_ready(target, server)
        idle = _status(server.pid)
        with EngineClient(target) as client:

            def one(i: int) -> int:
                prompt = f"def handler_{i}(request):\n    "
                stream = client.generate_stream(model, prompt, max_tokens=tokens, temperature=0.0)
                return sum(1 for _ in stream)

            start = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(one, range(streams)))
            seconds = time.perf_counter() - start
        busy = _status(server.pid)
        print(json.dumps({
            "model": model, "kv_cache_bytes": kv_bytes, "max_model_len": max_len,
            "max_num_seqs": streams,
            "load_s": round(loaded, 1), "idle_rss_mib": idle["VmRSS"],
            "rss_after_mib": busy["VmRSS"], "peak_rss_mib": busy["VmHWM"],
            "streams": streams, "tokens_each": tokens, "seconds": round(seconds, 1),
        }))  # fmt: skip
    finally:
        server.terminate()
        server.wait(60)


def _wait_ready(target: str, server: subprocess.Popen, timeout: float = 600) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"engine serve exited: {server.stderr.read()[-2000:]}")
        with grpc.insecure_channel(target) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - start
            except grpc.RpcError:
                pass
        time.sleep(1)
    raise SystemExit("engine serve did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the GPT-2-small Hugging Face directory")
    b.add_argument("out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vocab", type=int, default=VOCAB)
    for key, value in GPT2_SMALL.items():
        b.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    e = sub.add_parser("export", help="engine export under /usr/bin/time -v")
    e.add_argument("hf_dir", type=Path)
    e.add_argument("--repo", type=Path, required=True)
    e.add_argument("--name", default="gpt2-small")
    e.add_argument("--fp16", action="store_true")
    e.add_argument("--int8", action="store_true")
    s = sub.add_parser("serve", help="engine serve: resident memory under 16 streams")
    s.add_argument("--repo", type=Path, required=True)
    s.add_argument("--model", default="gpt2-small")
    # 16 sequences of 256 tokens at GPT-2 small's 72 KiB a token (12 layers x K,V x 768 fp32)
    s.add_argument("--kv-cache-bytes", type=int, default=16 * 256 * 12 * 2 * 768 * 4)
    s.add_argument("--max-model-len", type=int, default=256)
    s.add_argument("--streams", type=int, default=16)
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--port", type=int, default=50077)
    a = parser.parse_args()
    if a.cmd == "build":
        shape = {k: getattr(a, k) for k in GPT2_SMALL}
        build(a.out, a.seed, a.vocab, shape)
    elif a.cmd == "export":
        export(a.hf_dir, a.repo, a.name, [f"--{p}" for p in ("fp16", "int8") if getattr(a, p)])
    else:
        serve(a.repo, a.model, a.kv_cache_bytes, a.max_model_len, a.streams, a.tokens, a.port)


if __name__ == "__main__":
    main()
