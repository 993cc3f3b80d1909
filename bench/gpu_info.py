"""The GPU a run measured on, and its memory and load during each run.

Two sources, both optional: torch (device name, compute capability, the CUDA runtime torch was
built with) where torch imports, and NVML (``pynvml`` from ``nvidia-ml-py``; else the
``nvidia-smi`` command) for the driver, the CUDA version the driver supports, and memory in use
on the whole device. Device-wide memory is what counts here: the served model lives in another
process (``engine serve``), which no in-process counter sees.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

POLL_S = 0.05  # NVML answers in microseconds; 20 samples/s resolves a one-second run


def device_index(device: str) -> int:
    """The CUDA ordinal of ``cuda``, ``cuda:N`` or ``tensorrt`` (which runs on GPU 0)."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _nvml() -> Any | None:
    """pynvml, initialised, or None when it is missing or finds no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError_LibraryNotFound / DriverNotLoaded
        return None


def _smi(query: str, index: int) -> list[str] | None:
    """One ``nvidia-smi --query-gpu`` row as strings, or None without the tool or a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]


def describe_gpu(device: str) -> dict[str, Any] | None:
    """Name, capability, memory, driver and CUDA versions of ``device``; None on ``cpu``."""
    if device == "cpu":
        return None
    index = device_index(device)
    info: dict[str, Any] = {"index": index}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda  # the CUDA runtime torch was built with
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(index)
            info.update(
                name=props.name,
                capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count,
                memory_total_mib=props.total_memory >> 20,
                cudnn=torch.backends.cudnn.version(),
            )
    except ImportError:
        pass
    nvml = _nvml()
    if nvml is not None:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        cuda = nvml.nvmlSystemGetCudaDriverVersion()  # e.g. 13000
        info.setdefault("name", _text(nvml.nvmlDeviceGetName(handle)))
        info.setdefault("memory_total_mib", nvml.nvmlDeviceGetMemoryInfo(handle).total >> 20)
        info.update(
            driver=_text(nvml.nvmlSystemGetDriverVersion()),
            driver_cuda=f"{cuda // 1000}.{cuda % 1000 // 10}",
        )
    else:
        row = _smi("name,driver_version,memory.total", index)
        if row:
            info.setdefault("name", row[0])
            info.setdefault("memory_total_mib", int(float(row[2])))
            info["driver"] = row[1]
    return info


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Sample = tuple[float, float | None]  # (MiB used on the device, GPU utilization %)


def memory_reader(device: str) -> Callable[[], Sample] | None:
    """A function returning the device's memory in use and its utilization now, or None."""
    index = device_index(device)
    nvml = _nvml()
    if nvml is not None:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)

        def read() -> Sample:
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used / (1 << 20)
            return used, float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        return read
    if _smi("memory.used", index) is None:
        return None

    def read_smi() -> Sample:
        row = _smi("memory.used,utilization.gpu", index)
        if row is None:
            raise RuntimeError("nvidia-smi stopped answering")
        return float(row[0]), float(row[1])

    return read_smi


@dataclass(frozen=True)
class GpuLoad:
    """Device-wide memory and utilization over one run."""

    memory_used_start_mib: float
    memory_used_max_mib: float
    utilization_mean: float | None  # percent of time a kernel ran (NVML's definition)
    samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)


class GpuMonitor:
    """Samples a reader in a thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, read: Callable[[], Sample], poll_s: float = POLL_S):
        self.read, self.poll_s = read, poll_s
        self._samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuMonitor:
        """Take the first sample now, then keep sampling in the background."""
        self._samples = [self.read()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bench-gpu", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._samples.append(self.read())
            except Exception:  # a reader that fails mid-run ends sampling, not the run
                return

    def stop(self) -> GpuLoad:
        """Stop sampling; one last sample; the figures of the run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):  # the reader may have died with the run
            self._samples.append(self.read())
        used = [m for m, _ in self._samples]
        busy = [u for _, u in self._samples if u is not None]
        return GpuLoad(
            memory_used_start_mib=used[0],
            memory_used_max_mib=max(used),
            utilization_mean=sum(busy) / len(busy) if busy else None,
            samples=len(self._samples),
        )
