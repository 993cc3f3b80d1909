"""The committed generated code is current, and the KServe protocol matches tritonclient's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "engine" / "proto"


def test_generated_code_is_current(tmp_path):
    """Regenerating from proto/ reproduces engine/proto/ byte for byte."""
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(
        p.name
        for p in GENERATED.iterdir()
        if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py"
    )
    assert fresh == committed
    stale = [n for n in fresh if (tmp_path / n).read_text() != (GENERATED / n).read_text()]
    assert not stale, f"run `python proto/generate.py`: {stale} are out of date"


def test_the_install_floors_are_what_the_generated_code_checks_at_import():
    """pyproject's grpcio/protobuf floors equal the versions the stubs refuse to run below."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = {}
    for dep in deps:
        found = re.match(r"(grpcio|protobuf)>=([\d.]+)", dep)
        if found:
            floor[found[1]] = found[2]
    code = "".join((GENERATED / n).read_text() for n in ("engine_pb2.py", "engine_pb2_grpc.py"))
    protobuf = re.search(r"# Protobuf Python Version: ([\d.]+)", code).group(1)
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", code).group(1)
    assert floor == {"grpcio": grpc_version, "protobuf": protobuf}


def _fields(descriptor) -> dict:
    """Every field of a message and its nested messages: name -> (number, type, label)."""
    out = {}
    for field in descriptor.fields:
        out[f"{descriptor.full_name}.{field.name}"] = (field.number, field.type, field.is_repeated)
    for nested in descriptor.nested_types:
        out.update(_fields(nested))
    return out


def test_kserve_messages_match_tritonclient():
    """Every message, field and RPC we declare is tritonclient's: numbers, types, streaming.

    Triton's model-management messages are declared in part (fields this engine never sets are
    left out), so ours must be a subset of theirs; the inference messages are complete.
    """
    from tritonclient.grpc import model_config_pb2, service_pb2

    from engine.proto import grpc_predict_v2_pb2 as ours
    from engine.proto import model_config_pb2 as our_config

    theirs = service_pb2.DESCRIPTOR
    complete = {"ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse"}
    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        mine, other = _fields(message), _fields(theirs.message_types_by_name[name])
        assert mine.items() <= other.items(), name
        if name in complete:
            assert mine == other, name
    for name, message in our_config.DESCRIPTOR.message_types_by_name.items():
        other = _fields(model_config_pb2.DESCRIPTOR.message_types_by_name[name])
        assert _fields(message).items() <= other.items(), name
    data_type = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in our_config.DataType.DESCRIPTOR.values} == {
        v.name: v.number for v in data_type.values
    }
    our_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = theirs.services_by_name["GRPCInferenceService"]
    assert our_service.full_name == "inference.GRPCInferenceService"
    for method in our_service.methods:
        other = their_service.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )


def test_engine_proto_and_tritonclient_share_a_process():
    """Importing both copies of the `inference` package in one process works (private pool)."""
    code = (
        "import tritonclient.grpc.service_pb2 as t; "
        "from engine.proto import grpc_predict_v2_pb2 as o; "
        "r = o.ModelInferRequest(model_name='m', id='x'); "
        "assert t.ModelInferRequest.FromString(r.SerializeToString()).id == 'x'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
