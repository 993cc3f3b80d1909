"""The model repository: version counting, --force, atomic versions, hashes, torch-free readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import repository as repo_mod
from engine.repository import (
    ChecksumMismatch,
    Manifest,
    ManifestError,
    RepositoryError,
    VersionExists,
    latest_version,
    list_models,
    read_manifest,
    staged_version,
    verify_files,
    version_dir,
    versions,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[2]


def _write_version(repo: Path, name: str, payload: bytes, force: bool = False) -> Path:
    with staged_version(repo, name, force=force) as (tmp, version):
        (tmp / "model.onnx").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "vocab.txt").write_text("a b c")
        write_manifest(tmp, Manifest(name, version, "onnx", "generate", "decoder-lm"))
    return repo / name / str(version)


def test_versions_count_up_and_force_overwrites_latest(tmp_path):
    repo = tmp_path / "repo"
    assert versions(repo, "m") == []
    first = _write_version(repo, "m", b"one")
    second = _write_version(repo, "m", b"two")
    assert (first.name, second.name) == ("1", "2")
    assert versions(repo, "m") == [1, 2] and latest_version(repo, "m") == 2
    forced = _write_version(repo, "m", b"three", force=True)
    assert forced == second and versions(repo, "m") == [1, 2]
    assert (second / "model.onnx").read_bytes() == b"three"
    assert (first / "model.onnx").read_bytes() == b"one"
    assert read_manifest(second).version == 2
    assert list_models(repo) == {"m": [1, 2]}
    assert version_dir(repo, "m") == second and version_dir(repo, "m", 1) == first


def test_force_on_an_empty_model_writes_version_1(tmp_path):
    assert _write_version(tmp_path, "m", b"x", force=True).name == "1"


def test_failed_export_leaves_nothing_behind(tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(KeyboardInterrupt), staged_version(repo, "m") as (tmp, _):
        (tmp / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not repo.exists()  # not even empty folders
    _write_version(repo, "m", b"one")
    with pytest.raises(RuntimeError), staged_version(repo, "m") as (tmp, version):
        assert version == 2
        raise RuntimeError("boom")
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1"]  # no hidden temp dirs


def test_forced_export_that_fails_keeps_the_old_version(tmp_path):
    old = _write_version(tmp_path, "m", b"good")
    with pytest.raises(RuntimeError), staged_version(tmp_path, "m", force=True) as (tmp, _):
        (tmp / "model.onnx").write_bytes(b"bad")
        raise RuntimeError("boom")
    assert (old / "model.onnx").read_bytes() == b"good"
    verify_files(old)


def test_a_concurrent_export_of_the_same_version_is_refused(tmp_path):
    with pytest.raises(VersionExists, match="--force"), staged_version(tmp_path, "m") as (tmp, v):
        (tmp_path / "m" / str(v)).mkdir()  # another process finished version 1 meanwhile
    assert versions(tmp_path, "m") == [1]


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
    vdir = _write_version(tmp_path, "m", b"weights")
    manifest = verify_files(vdir)
    assert [f.path for f in manifest.files] == ["model.onnx", "sub/vocab.txt"]
    assert all(f.sha256 == repo_mod.sha256_file(vdir / f.path) for f in manifest.files)
    assert manifest.files[0].bytes == len(b"weights")

    (vdir / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(ChecksumMismatch, match="model.onnx"):
        verify_files(vdir)
    (vdir / "sub" / "vocab.txt").unlink()
    with pytest.raises(ChecksumMismatch, match="vocab.txt is missing"):
        verify_files(vdir)


def test_readers_fail_clearly(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist"):
        list_models(tmp_path / "nowhere")
    _write_version(tmp_path, "m", b"x")
    with pytest.raises(RepositoryError, match="no model 'other'.*models there: m"):
        latest_version(tmp_path, "other")
    with pytest.raises(RepositoryError, match="no version 7"):
        version_dir(tmp_path, "m", 7)
    (tmp_path / "m" / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(tmp_path / "m" / "1")
    with pytest.raises(ManifestError, match="missing"):
        read_manifest(tmp_path)
    with pytest.raises(RepositoryError, match="model name"):
        _write_version(tmp_path, "../escape", b"x")


def test_readers_and_format_registration_never_import_torch(tmp_path):
    _write_version(tmp_path, "m", b"x")
    code = f"""
import sys
from engine.repository import latest_version, list_models, verify_files, version_dir
import pluggy
import exporters.onnx_format, exporters.tensorrt_format
from engine import hookspecs
from engine.plugins import export_formats
assert list_models({str(tmp_path)!r}) == {{"m": [1]}}
verify_files(version_dir({str(tmp_path)!r}, "m"))
pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)
pm.register(exporters.onnx_format)
pm.register(exporters.tensorrt_format)
assert sorted(export_formats(pm)) == ["onnx", "tensorrt"]
bad = sorted(m for m in ("torch", "onnx", "onnxruntime", "tensorrt") if m in sys.modules)
assert not bad, bad
print(json.dumps("ok"))
"""
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "ok"


def test_manifest_round_trips_and_names_what_a_malformed_one_lacks(tmp_path):
    vdir = _write_version(tmp_path, "m", b"x")
    manifest = read_manifest(vdir)
    manifest.sections["tensorrt"] = {"engines": {}}  # a format's own section survives
    again = Manifest.from_dict(manifest.to_dict())
    assert again == manifest and again.graph  # typed fields and sections both kept
    data = json.loads((vdir / "manifest.json").read_text())
    del data["task"]
    (vdir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="lacks task"):
        read_manifest(vdir)
    with pytest.raises(RepositoryError, match="has no 'kv_inplace' graph"):
        manifest.graph("kv_inplace")
