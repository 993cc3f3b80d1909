"""Bearer-token auth (health stays open) and TLS with a self-signed certificate made here."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import numpy as np
import pytest

from engine.client import ClientError, EngineClient
from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from tests.server.conftest import start_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def auth_server():
    srv = start_server(auth_token=TOKEN)
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
def test_missing_or_wrong_token_is_unauthenticated(auth_server, metadata):
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        for call in (
            lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata),
            lambda: list(
                stub.Generate(pb.GenerateRequest(model="lm", prompt="x"), metadata=metadata)
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_passes_and_health_stays_open(auth_server):
    pytest.importorskip("grpc_health", reason="grpcio-health-checking is not installed")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(auth_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="lm")).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with EngineClient(auth_server.target, token=TOKEN) as client:
        assert {m.name for m in client.models()} == {"lm", "clf", "gan"}
        text, reason = client.generate("lm", "ab", max_tokens=3)
        assert len(text) == 3 and reason == "length"
    with EngineClient(auth_server.target) as client, pytest.raises(ClientError) as info:
        client.models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_tritonclient_sends_the_token_as_a_header(auth_server):
    tg = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(auth_server.target)
    text = tg.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello"], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer("clf", [text])
    assert "UNAUTHENTICATED" in info.value.status()
    result = client.infer("clf", [text], headers={"authorization": f"Bearer {TOKEN}"})
    assert result.as_numpy("label").shape == (1,)
    client.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost/127.0.0.1 made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_with_a_self_signed_certificate(certificate):
    cert, key = certificate
    srv = start_server(tls_cert=cert.read_bytes(), tls_key=key.read_bytes(), auth_token=TOKEN)
    try:
        with EngineClient(srv.target, token=TOKEN, tls_ca=cert) as client:
            assert client.classify("clf", ["hello"])[0].label in {"neg", "neu", "pos"}
        with grpc.insecure_channel(srv.target) as plain:  # plaintext to a TLS port fails
            stub = engine_pb2_grpc.EngineServiceStub(plain)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        tg = pytest.importorskip("tritonclient.grpc")
        triton = tg.InferenceServerClient(srv.target, ssl=True, root_certificates=str(cert))
        assert triton.is_server_live(headers={"authorization": f"Bearer {TOKEN}"})
        triton.close()
    finally:
        srv.stop()
