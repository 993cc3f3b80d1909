"""Atomic writes: build in a temporary sibling, then rename, so readers never see half a result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# Staged directories are named ``.<final>.<host>-<pid>.<random>.tmp`` so a later writer can tell
# whether the process that made one is still alive (same host, pid running) before sweeping it.
_TMP_SUFFIX = ".tmp"
LEGACY_TMP_AGE_S = 24 * 3600  # temporaries without a writer id are swept only when this old


def _host_id() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _writer_of(tmp_name: str, final_name: str) -> tuple[str, int] | None:
    """(host, pid) of a staged directory's writer; None for a legacy or unrelated name."""
    prefix = f".{final_name}."
    if not (tmp_name.startswith(prefix) and tmp_name.endswith(_TMP_SUFFIX)):
        return None
    writer = tmp_name[len(prefix) : -len(_TMP_SUFFIX)].split(".", 1)[0]
    host, _, pid = writer.rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def sweep_stale(final: Path) -> list[Path]:
    """Remove temporaries beside ``final`` left by writers that died; return what was removed.

    A temporary is removed only when its writer is known dead: it was made on this host by a
    process id that no longer runs. Temporaries of live writers, of other hosts, and of the
    old unnamed form younger than :data:`LEGACY_TMP_AGE_S` are left alone.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for entry in final.parent.iterdir():
        name = entry.name
        if not (entry.is_dir() and name.startswith(f".{final.name}.")):
            continue
        if not name.endswith(_TMP_SUFFIX):
            continue
        writer = _writer_of(name, final.name)
        if writer is None:
            try:
                stale = time.time() - entry.stat().st_mtime > LEGACY_TMP_AGE_S
            except FileNotFoundError:
                continue
        else:
            host, pid = writer
            stale = host == _host_id() and pid != os.getpid() and not _pid_alive(pid)
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success rename it into place, else delete it.

    With ``replace`` an existing ``final`` is swapped out only after the new one is complete.
    Temporaries that dead writers (a SIGKILLed export) left beside ``final`` are swept first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    prefix = f".{final.name}.{_host_id()}-{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=_TMP_SUFFIX))
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
