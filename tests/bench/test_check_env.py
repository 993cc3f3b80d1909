"""bench/check_env.py: what a GPU host run checks first, and which carried wheels it installs."""

from __future__ import annotations

from bench import check_env


def test_requirements_are_checked_against_the_installed_versions():
    rows = {r[0]: r for r in check_env.check(["numpy>=1", "numpy<1", "no-such-pkg>=1"], set())}
    assert rows["numpy"][3] == "ok"  # the first spec of a name wins
    assert rows["no-such-pkg"][2:] == ("-", "MISSING")
    mismatch = check_env.check(["numpy<1"], set())[0]
    assert mismatch[3] == "MISMATCH"
    assert check_env.check(["no-such-pkg"], {"no-such-pkg"})[0][3] == "-"  # reported only


def test_grpcio_and_protobuf_come_first():
    rows = check_env.check(check_env.requirements(["train", "bench"]), set())
    assert [r[0] for r in rows[:2]] == ["grpcio", "protobuf"]
    assert {"transformers", "torch", "grpcio-health-checking"} <= {r[0] for r in rows}


def test_only_wheels_of_missing_or_out_of_range_packages_are_installed(tmp_path):
    for name in (
        "grpcio_health_checking-1.81.1-py3-none-any.whl",  # installed here, in range
        "protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",  # out of range below
        "no_such_pkg-1.0-py3-none-any.whl",  # not installed
    ):
        (tmp_path / name).write_bytes(b"")
    specs = ["grpcio-health-checking>=1.81.1", "protobuf>=99"]
    needed = [p.name for p in check_env.needed_wheels(tmp_path, specs)]
    assert needed == [
        "no_such_pkg-1.0-py3-none-any.whl",
        "protobuf-6.33.6-cp39-abi3-manylinux2014_x86_64.whl",
    ]


def test_main_reports_and_fails_on_a_missing_requirement(capsys, monkeypatch):
    assert check_env.main(["--extras", "bench"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "grpcio" and "every requirement is met" in out
    real = check_env.requirements
    monkeypatch.setattr(check_env, "requirements", lambda extras: [*real(extras), "no-such-pkg"])
    assert check_env.main([]) == 1
    assert "FAILED: no-such-pkg (missing" in capsys.readouterr().err
