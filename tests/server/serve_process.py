"""Run a server in this process for tests that need a real process (signals, sys.modules).

    python tests/server/serve_process.py --fake [--delay S] [--grace S]
    python tests/server/serve_process.py --repo DIR [--models a,b] [--max-num-seqs N]
        [--kv-cache-bytes B] [--no-prefix-caching]
    python tests/server/serve_process.py --fake --without grpc_health,grpc_reflection

Prints one JSON line once the port accepts connections: the ports and whether torch is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_when_listening(port: int, metrics_port: int) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    ready = {"port": port, "metrics_port": metrics_port, "torch_loaded": "torch" in sys.modules}
    print(json.dumps(ready), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--models")
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--auth-token-file", type=Path)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-cache-bytes", type=int)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--without", default="", help="packages to hide, as if not installed")
    parser.add_argument("--version-policy", default="latest:1")
    args = parser.parse_args()
    for name in filter(None, args.without.split(",")):
        sys.modules[name] = None  # `import name` now raises ImportError
    port, metrics_port = free_port(), free_port()
    threading.Thread(target=report_when_listening, args=(port, metrics_port), daemon=True).start()
    if args.fake:
        from engine.server import logs
        from engine.server.app import EngineServer, ServerConfig
        from tests.server.fakes import fake_models

        logs.configure("WARNING")

        async def run() -> None:
            config = ServerConfig(port=port, metrics_port=metrics_port, grace=args.grace)
            await EngineServer(fake_models(args.delay), config).run_until_signal()

        asyncio.run(run())
    else:
        from engine.server.cli_commands import serve

        serve(
            args.repo,
            models=args.models,
            port=port,
            metrics_port=metrics_port,
            grace=args.grace,
            auth_token_file=args.auth_token_file,
            version_policy=args.version_policy,
            max_num_seqs=args.max_num_seqs,
            kv_cache_bytes=args.kv_cache_bytes,
            prefix_caching=not args.no_prefix_caching,
            log_level="WARNING",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
