"""Regenerate engine/proto/ from the .proto files here with grpc_tools.protoc.

Usage: ``python proto/generate.py [--out DIR]`` (default: engine/proto). A test regenerates
into a temporary directory and diffs against the committed files, so run this after editing a
.proto and commit the result. Needs grpcio-tools (a dev dependency; the pinned version decides
the generated protobuf runtime version).

protoc writes modules that import each other by their .proto path (``from kserve import ...``)
and register in protobuf's default descriptor pool. Both are rewritten here: imports become
package-relative so the code lives at ``engine.proto``, and descriptors go to
``engine.proto.POOL`` so this package and tritonclient's copy of ``inference`` can share a
process.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "engine" / "proto"
PROTOS = ("engine/v1/engine.proto", "kserve/model_config.proto", "kserve/grpc_predict_v2.proto")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _module_of(proto: str) -> str:
    """The dotted module protoc derives from a .proto path (``kserve.grpc_predict_v2``)."""
    return proto.removesuffix(".proto").replace("/", ".")


def _rewrite(text: str) -> str:
    """Make one generated file package-relative and bind it to the private pool."""
    for proto in PROTOS:
        dotted = _module_of(proto)
        package, _, stem = dotted.rpartition(".")
        # `from kserve import grpc_predict_v2_pb2 as x` -> `from . import grpc_predict_v2_pb2 as x`
        text = re.sub(
            rf"^from {re.escape(package)} import ({stem}_pb2\w*)",
            r"from . import \1",
            text,
            flags=re.M,
        )
        text = text.replace(f"'{dotted}_pb2'", f"'engine.proto.{stem}_pb2'")
    if "_descriptor_pool.Default()" in text:
        text = text.replace("_descriptor_pool.Default()", "_POOL")
        text = text.replace(
            "# @@protoc_insertion_point(imports)",
            "from . import POOL as _POOL\n# @@protoc_insertion_point(imports)",
            1,
        )
    return text


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto and write the rewritten modules into ``out_dir``."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / path.name  # flatten: engine/v1/engine_pb2.py -> engine_pb2.py
                target.write_text(_rewrite(path.read_text()))
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, regenerate, and print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
