import pytest

from engine.atomic import staged_dir, write_json


def test_staged_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("crash")
    assert (target / "old").read_text() == "old"  # the good one survives a failed rewrite
    with staged_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new"]


def test_staged_dir_refuses_to_clobber_without_replace(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError), staged_dir(tmp_path / "out"):
        pass


def test_write_json_is_complete(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1})
    assert (tmp_path / "a.json").read_text().strip() == '{\n  "b": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


_WRITER = """
import sys, time
from pathlib import Path
from engine.atomic import staged_dir
with staged_dir(Path(sys.argv[1])) as tmp:
    (tmp / "weights.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _start_writer(target):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True, cwd=root
    )
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_writers_temporary_is_swept_and_a_live_ones_is_not(tmp_path):
    import os
    import signal

    target = tmp_path / "m" / "1"
    dead, dead_tmp = _start_writer(target)
    live, live_tmp = _start_writer(target)
    try:
        os.kill(dead.pid, signal.SIGKILL)  # as an export killed while tracing
        dead.wait()
        assert dead_tmp.is_dir() and not target.exists()
        with staged_dir(target) as tmp:
            (tmp / "ok").write_text("ok")
        assert not dead_tmp.exists()  # swept: its writer is gone
        assert live_tmp.is_dir()  # never a temporary another live process is writing
        assert (target / "ok").read_text() == "ok"
    finally:
        live.kill()
        live.wait()


def test_legacy_temporaries_are_swept_only_when_old(tmp_path):
    import os
    import time

    from engine import atomic

    young = tmp_path / ".1.abc123.tmp"
    old = tmp_path / ".1.def456.tmp"
    young.mkdir()
    old.mkdir()
    stamp = time.time() - atomic.LEGACY_TMP_AGE_S - 60
    os.utime(old, (stamp, stamp))
    removed = atomic.sweep_stale(tmp_path / "1")
    assert removed == [old] and young.is_dir() and not old.exists()
