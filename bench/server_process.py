"""``engine serve`` as a child process, so the load generator and the server never share a GIL.

The server binds free ports (``--port 0 --metrics-port 0``) and prints the bound ones in its
ready line on stderr; a reader thread keeps draining stderr (a full pipe would stall the server)
and keeps the last lines for the error message if it dies. Stopped with SIGTERM, as in
production, and killed only if it outlives its grace period.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import EngineError

READY = re.compile(
    r"^serving .* on grpcs?://(?P<host>[^\s,]+):(?P<port>\d+)(, metrics on (?P<m>\S+))?"
)


class ServerProcessError(EngineError):
    """The server did not start (the message carries the end of its log)."""


@dataclass(frozen=True)
class ServeOptions:
    """How the bench starts ``engine serve``; the flags pass through unchanged."""

    device: str = "cpu"  # --device: cpu, cuda or tensorrt
    threads: int | None = None  # --threads: intra-op threads (None: the server's default)
    dynamic_batching: bool = True  # False: --no-dynamic-batching (batch size 1)
    # The language model's engine; None keeps `engine serve`'s default. The in-process
    # baselines get the same values (bench.runner.Bench._context).
    max_num_seqs: int | None = None  # --max-num-seqs
    gpu_memory_utilization: float | None = None  # --gpu-memory-utilization (CUDA, torch format)
    dtype: str | None = None  # --dtype (torch format)
    cuda_graphs: bool = True  # False: --no-cuda-graphs
    extra_args: tuple[str, ...] = ()  # any other `engine serve` flags, verbatim
    startup_timeout_s: float = 180.0  # loading checks every file's hash first
    grace_s: float = 5.0  # drain time on SIGTERM; the bench stops it between runs only


@dataclass
class ServerProcess:
    """A running ``engine serve``; use as a context manager."""

    repo: Path
    model: str
    options: ServeOptions = field(default_factory=ServeOptions)
    target: str = ""
    metrics_url: str | None = None

    def __post_init__(self) -> None:
        self._log: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        """The argv the server runs with."""
        opts = self.options
        argv = [sys.executable, "-m", "engine", "serve", "--repo", str(self.repo)]
        argv += ["--models", self.model, "--port", "0", "--metrics-port", "0"]
        argv += ["--grace", str(opts.grace_s), "--log-level", "WARNING"]
        if opts.device != "cpu":
            argv += ["--device", opts.device]
        if opts.threads:
            argv += ["--threads", str(opts.threads)]
        if not opts.dynamic_batching:
            argv.append("--no-dynamic-batching")
        if opts.max_num_seqs:
            argv += ["--max-num-seqs", str(opts.max_num_seqs)]
        if opts.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
        if opts.dtype:
            argv += ["--dtype", opts.dtype]
        if not opts.cuda_graphs:
            argv.append("--no-cuda-graphs")
        return argv + list(opts.extra_args)

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            line = line.rstrip()
            self._log.append(line)
            found = READY.match(line)
            if found and not self._ready.is_set():
                self.target = f"{found['host']}:{found['port']}"
                self.metrics_url = found["m"]
                self._ready.set()

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, all threads) the server has used so far; None if unknown."""
        proc = self._proc
        if proc is None:
            return None
        return process_cpu_seconds(proc.pid)

    def log_tail(self) -> str:
        """The last lines the server wrote."""
        return "\n".join(self._log)

    def start(self) -> ServerProcess:
        """Start the server and wait until it accepts calls."""
        self._proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._drain, name="bench-server-log", daemon=True).start()
        deadline = self.options.startup_timeout_s
        waited = 0.0
        while not self._ready.wait(0.1):
            waited += 0.1
            if self._proc.poll() is not None or waited > deadline:
                self.stop()
                raise ServerProcessError(
                    f"`engine serve` did not start ({' '.join(self.command()[1:])}):\n"
                    + (self.log_tail() or "(no output)")
                )
        return self

    def stop(self) -> int | None:
        """SIGTERM, wait out the grace period, kill if still there; return the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.options.grace_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state is field 3, utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
