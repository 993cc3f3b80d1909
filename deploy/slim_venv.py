"""Trim a serving venv to what `engine serve` loads: the serving image's last build step.

    python deploy/slim_venv.py /opt/engine            # trims, checks, prints MiB before/after
    python deploy/slim_venv.py /opt/engine --dry-run  # only says what it would remove

What goes, and why it is safe (each is checked after removal by importing the serving stack in
the venv's own interpreter, and the script exits 1 if that fails):
- bytecode (``__pycache__``): the image sets PYTHONDONTWRITEBYTECODE; imports compile in memory;
- pip and setuptools: nothing installs into a built image;
- onnxruntime's C-API library (``onnxruntime/capi/libonnxruntime.so*``, ~33 MiB): the Python
  binding links onnxruntime statically and does not load it (its ELF needs only libc, libstdc++,
  libm, libgcc_s, libdl, librt, libpthread); it is there for C/C++ programs and plugin EPs;
- huggingface_hub and what only it pulls in (hf_xet, httpx2, ...), when the only installed
  package that requires it is ``tokenizers``: tokenizers imports the hub only for
  ``Tokenizer.from_pretrained`` (a download), and the engine reads ``tokenizer.json`` from the
  model repository. With transformers installed (a training venv) the hub stays.

The standard library only (and ``packaging``, which onnxruntime requires), so it runs with the
venv's interpreter or any other.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ALWAYS = ("pip", "setuptools")
HUB = "huggingface-hub"
CHECK = (
    "import onnxruntime, onnxruntime.capi.onnxruntime_pybind11_state, tokenizers, grpc, numpy;"
    "import engine.cli, engine.server.app, engine.runtime.llm_engine;"
    "print(onnxruntime.get_available_providers())"
)


def canon(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def site_packages(venv: Path) -> Path:
    """The venv's site-packages directory."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"slim_venv: {venv} has no lib/python3*/site-packages: not a venv")
    return found[0]


def mib(path: Path) -> float:
    """Bytes of the files under ``path`` (links not followed), in MiB."""
    files = (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return sum(p.lstat().st_size for p in files) / 2**20


def requirements(dist: metadata.Distribution) -> set[str]:
    """Names ``dist`` requires unconditionally (no extras, markers true here)."""
    from packaging.requirements import Requirement

    names = set()
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.add(canon(req.name))
    return names


def hub_orphans(dists: dict[str, metadata.Distribution]) -> list[str]:
    """huggingface_hub and the packages only it needs, if tokenizers alone requires the hub."""
    needs = {name: requirements(d) for name, d in dists.items()}
    if HUB not in dists or {n for n, r in needs.items() if HUB in r} != {"tokenizers"}:
        return []
    gone = {HUB}
    changed = True
    while changed:  # a package goes when everything that requires it is going
        changed = False
        for name in dists:
            users = {n for n, r in needs.items() if name in r}
            if name not in gone and users and users <= gone:
                gone.add(name)
                changed = True
    return sorted(gone)


def distribution_paths(site: Path, dist: metadata.Distribution) -> list[Path]:
    """Every file a distribution installed (its RECORD), inside site-packages or the venv."""
    paths = []
    for f in dist.files or []:
        p = (site / f).resolve()
        if p.is_file() or p.is_symlink():
            paths.append(p)
    return paths


def plan(venv: Path) -> tuple[list[Path], list[str]]:
    """What to remove: files, and the distributions they belong to (for the report)."""
    site = site_packages(venv)
    dists = {canon(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    names = [n for n in ALWAYS if n in dists] + hub_orphans(dists)
    files: list[Path] = []
    for name in names:
        files += distribution_paths(site, dists[name])
    files += sorted((site / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
    files += [p for p in venv.rglob("*.pyc")]
    return files, names


def main(argv: list[str] | None = None) -> int:
    """Trim the venv, then check that the serving stack still imports with its interpreter."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("venv", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    venv = args.venv.resolve()
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"slim_venv: {python} does not exist: not a venv", file=sys.stderr)
        return 2
    before = mib(venv)
    files, names = plan(venv)
    print(f"slim_venv: {venv}: {before:.0f} MiB; removing {len(files)} files of {', '.join(names)}")
    if args.dry_run:
        return 0
    for path in files:
        path.unlink(missing_ok=True)
    for cache in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache, ignore_errors=True)
    site = site_packages(venv)
    for leftover in site.iterdir():  # package dirs emptied by removing their files
        if leftover.is_dir() and not any(p.is_file() for p in leftover.rglob("*")):
            shutil.rmtree(leftover)
    done = subprocess.run(
        [str(python), "-c", CHECK],
        capture_output=True,
        text=True,
        env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0:
        tail = done.stderr[-2000:]
        print(f"slim_venv: the trimmed venv no longer serves:\n{tail}", file=sys.stderr)
        return 1
    print(f"slim_venv: {venv}: {mib(venv):.0f} MiB after (was {before:.0f}); serving stack imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
