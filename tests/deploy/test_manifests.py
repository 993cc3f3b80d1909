"""deploy/: the KServe manifests validate against the kserve SDK's models and fit the server.

No cluster or docker here: each YAML is checked field by field against the SDK's generated
models (an unknown or misspelled key fails, where the SDK's own deserializer would drop it),
then against the engine itself: the container's arguments parse as ``engine serve`` flags, the
gRPC port, health service and metrics port agree, and the autoscaling query names a metric the
server exports.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
if importlib.util.find_spec("kserve") is None:  # not imported here: see sdk_check
    pytest.skip(
        "the kserve SDK is not installed: pip install -e '.[deploy]'", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHECK = DEPLOY / "check_manifests.py"


def sdk_check(*paths: Path) -> subprocess.CompletedProcess:
    """deploy/check_manifests.py in its own process: the kserve SDK registers protobuf names
    (package ``inference``) that clash with tritonclient's in one process."""
    return subprocess.run(
        [sys.executable, str(CHECK), *map(str, paths)], capture_output=True, text=True, timeout=300
    )


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "kserve" / name).read_text())


def test_both_manifests_match_the_kserve_sdk_models():
    done = sdk_check(
        DEPLOY / "kserve" / "servingruntime.yaml", DEPLOY / "kserve" / "inferenceservice.yaml"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "V1alpha1ServingRuntime" in done.stdout and "V1beta1InferenceService" in done.stdout


@pytest.fixture(scope="module")
def runtime() -> dict:
    doc = load("servingruntime.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    return doc


@pytest.fixture(scope="module")
def isvc() -> dict:
    doc = load("inferenceservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    return doc


def serve_options(args: list[str]) -> dict:
    """Parse ``engine serve ARGS`` with the CLI itself (unknown flags fail)."""
    import typer

    from engine.cli import app

    command = typer.main.get_command(app).commands["serve"]
    return command.make_context("serve", list(args)).params


def test_the_strict_check_catches_a_misspelled_field(tmp_path):
    text = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    broken = tmp_path / "isvc.yaml"
    broken.write_text(text.replace("minReplicas:", "minReplica:"))
    done = sdk_check(broken)
    assert done.returncode == 1 and "has no field 'minReplica'" in done.stdout


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
    # then trimmed as tests/install/test_serving_install.py trims the venv it serves from
    assert re.search(r"COPY deploy/slim_venv.py (\S+)\n", dockerfile)
    assert re.search(r"/opt/engine/bin/python \S*slim_venv.py /opt/engine", dockerfile)
    cmd = re.search(r"^CMD (\[.*\])", dockerfile, re.M).group(1)
    args = shlex.split(cmd.strip("[]").replace(",", " "))
    options = serve_options(args)
    assert options["repo"] == Path("/mnt/models") and options["port"] == 8081
    assert re.search(r'^ENTRYPOINT \["engine", "serve"\]', dockerfile, re.M)
