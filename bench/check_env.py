"""Check the interpreter's packages against pyproject.toml before a run on a machine we don't own.

    python3 bench/check_env.py [--extras bench,dev] [--not-needed ruff,...] [--device cuda]
    python3 bench/check_env.py --needed-wheels .whl     the carried wheels to install here

A GPU host brings its own Python and packages, and the project runs there from its source tree
without being installed, so nothing has checked our pins. This prints grpcio and protobuf first
(the generated stubs refuse to import below their floors), then every requirement of the project
and the named extras with the installed version, then the GPU. Exit 1 if a requirement is
missing or outside its range, so a run stops before it measures anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST = ("grpcio", "protobuf")  # the stubs check these at import: print them before anything


def requirements(extras: list[str]) -> list[str]:
    """The project's dependencies plus those of ``extras``, as written in pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"check_env: no extra {extra!r}; pyproject has {', '.join(optional)}")
        found += optional[extra]
    return found


def check(specs: list[str], not_needed: set[str]) -> list[tuple[str, str, str, str]]:
    """(name, required, installed, verdict) per requirement; verdict ok, MISSING, MISMATCH, -."""
    from packaging.requirements import Requirement

    rows, seen = [], set()
    for text in specs:
        req = Requirement(text)
        name = req.name.lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = ""
        if name in not_needed:
            verdict = "-"
        elif not installed:
            verdict = "MISSING"
        else:
            ok = req.specifier.contains(installed, prereleases=True)
            verdict = "ok" if ok else "MISMATCH"
        rows.append((req.name, str(req.specifier) or "any", installed or "-", verdict))
    first = {n: i for i, n in enumerate(FIRST)}
    return sorted(rows, key=lambda r: first.get(r[0].lower(), len(first)))


def needed_wheels(folder: Path, specs: list[str]) -> list[Path]:
    """The wheels in ``folder`` whose package is missing here or outside pyproject's range.

    A package the host already has in range keeps the host's version: two copies of grpcio or
    protobuf in one process is worse than a slightly different one.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wanted = {canonicalize_name(Requirement(t).name): Requirement(t) for t in specs}
    out = []
    for wheel in sorted(Path(folder).glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        req = wanted.get(name)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        in_range = req is None or req.specifier.contains(installed or "0", prereleases=True)
        if installed is None or not in_range:
            out.append(wheel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma list of extras to check too")
    parser.add_argument("--not-needed", default="", help="comma list reported but not required")
    parser.add_argument("--device", default="cpu", help="describe this GPU (cuda, cuda:N)")
    parser.add_argument("--json", type=Path, help="also write the findings here")
    parser.add_argument("--needed-wheels", type=Path, help="print the wheels of DIR to install")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    if args.needed_wheels:
        print("\n".join(str(w) for w in needed_wheels(args.needed_wheels, requirements(extras))))
        return 0
    not_needed = {n.strip().lower() for n in args.not_needed.split(",") if n.strip()}
    rows = check(requirements(extras), not_needed)
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    width = max(len(r[0]) for r in rows)
    for name, wanted, installed, verdict in rows:
        print(f"  {name:<{width}}  {installed:<16} {wanted:<24} {verdict}")
    sys.path.insert(0, str(ROOT))
    from bench.gpu_info import describe_gpu

    gpu = describe_gpu(args.device)
    if gpu is not None:
        print("gpu " + json.dumps(gpu))
    bad = [r for r in rows if r[3] in ("MISSING", "MISMATCH")]
    if args.json:
        findings = {"python": platform.python_version(), "packages": rows, "gpu": gpu}
        args.json.write_text(json.dumps(findings, indent=1))
    if bad:
        names = ", ".join(f"{n} ({v.lower()}: {i} vs {w})" for n, w, i, v in bad)
        print(f"check_env: FAILED: {names}", file=sys.stderr)
        return 1
    print("check_env: every requirement is met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
