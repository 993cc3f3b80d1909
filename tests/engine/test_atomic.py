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
