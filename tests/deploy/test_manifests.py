"""deploy/: the KServe manifests validate against the kserve SDK's models and fit the server.

No cluster or docker here: each YAML is checked field by field against the SDK's generated
models (an unknown or misspelled key fails, where the SDK's own deserializer would drop it),
then against the engine itself: the container's arguments parse as ``engine serve`` flags, the
gRPC port, health service and metrics port agree, and the autoscaling query names a metric the
server exports.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kserve_models = pytest.importorskip(
    "kserve.models", reason="kserve SDK: pip install -e '.[deploy]'"
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def _model_class(name: str):
    for module in ("kserve.models", "kubernetes.client.models"):
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise AssertionError(f"no SDK model {name}")


def check(value, type_name: str, path: str) -> None:
    """Fail unless ``value`` fits the SDK type ``type_name`` in every key, recursively."""
    if type_name in PRIMITIVES:
        assert isinstance(value, PRIMITIVES[type_name]), f"{path}: {value!r} is not {type_name}"
        return
    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: not a list"
        for i, item in enumerate(value):
            check(item, match.group(1), f"{path}[{i}]")
        return
    if match := re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name):
        assert isinstance(value, dict), f"{path}: not a mapping"
        for key, item in value.items():
            check(item, match.group(1) or match.group(2), f"{path}.{key}")
        return
    if type_name.endswith("Quantity"):  # resource.Quantity: a string or number on the wire
        assert isinstance(value, (str, int, float)), f"{path}: {value!r} is not a quantity"
        return
    cls = _model_class(type_name)
    if not cls.openapi_types:  # int-or-string and the like: a scalar on the wire
        assert isinstance(value, (str, int, float)), f"{path}: {value!r} is not a scalar"
        return
    assert isinstance(value, dict), f"{path}: {type_name} must be a mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        assert key in by_json, f"{path}: {type_name} has no field {key!r}"
        check(item, cls.openapi_types[by_json[key]], f"{path}.{key}")


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "kserve" / name).read_text())


@pytest.fixture(scope="module")
def runtime() -> dict:
    doc = load("servingruntime.yaml")
    check(doc, "V1alpha1ServingRuntime", "ServingRuntime")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    return doc


@pytest.fixture(scope="module")
def isvc() -> dict:
    doc = load("inferenceservice.yaml")
    check(doc, "V1beta1InferenceService", "InferenceService")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    return doc


def serve_options(args: list[str]) -> dict:
    """Parse ``engine serve ARGS`` with the CLI itself (unknown flags fail)."""
    import typer

    from engine.cli import app

    command = typer.main.get_command(app).commands["serve"]
    return command.make_context("serve", list(args)).params


def test_the_strict_check_catches_a_misspelled_field():
    with pytest.raises(AssertionError, match="no field 'minReplica'"):
        check({"spec": {"predictor": {"minReplica": 1}}}, "V1beta1InferenceService", "isvc")


def test_the_runtime_speaks_v2_grpc_with_gRPC_health_on_the_port_it_serves(runtime):
    from engine.server.app import ENGINE_SERVICE, KSERVE_SERVICE

    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    (container,) = runtime["spec"]["containers"]
    options = serve_options(container["args"])
    (port,) = [p for p in container["ports"] if p["name"] == "h2c"]
    assert port["containerPort"] == options["port"] == container["readinessProbe"]["grpc"]["port"]
    assert options["host"] == "0.0.0.0" and options["repo"] == Path("/mnt/models")
    assert container["readinessProbe"]["grpc"]["service"] in ("", ENGINE_SERVICE, KSERVE_SERVICE)
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == options["metrics_port"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_the_inference_service_uses_the_runtime_and_scales_on_the_queue_gauge(runtime, isvc):
    from engine.server.metrics import ServerMetrics

    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    (metric,) = predictor["autoScaling"]["metrics"]
    query = metric["external"]["metric"]["query"]
    exported = {m.name for m in ServerMetrics().registry.collect()}
    names = set(re.findall(r"[a-z_]+(?=\{)", query))
    assert names and names <= exported, f"{query} uses metrics the server does not export"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"


def test_the_image_installs_the_serving_package_only_and_runs_engine_serve():
    from tests.install.test_serving_install import SOURCES

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.M))
    assert set(SOURCES) <= copied | {"pyproject.toml", "README.md"}
    (install,) = re.findall(r"pip install[^\n&\\]*", dockerfile)
    assert install.split()[-1] == "." and "[" not in install  # no extras: no torch
    cmd = re.search(r"^CMD (\[.*\])", dockerfile, re.M).group(1)
    args = shlex.split(cmd.strip("[]").replace(",", " "))
    options = serve_options(args)
    assert options["repo"] == Path("/mnt/models") and options["port"] == 8081
    assert re.search(r'^ENTRYPOINT \["engine", "serve"\]', dockerfile, re.M)
