"""The KServe v2 protocol end to end with the unmodified tritonclient[grpc] client."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest

from engine.proto import grpc_predict_v2_pb2 as pb

tg = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException


@pytest.fixture()
def triton(server):
    client = tg.InferenceServerClient(server.target)
    yield client
    client.close()


def _bytes_input(name: str, values: list[bytes]):
    tensor = tg.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=object))
    return tensor


def test_liveness_readiness_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("lm") and triton.is_model_ready("clf", "2")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("clf", "7")
    assert triton.get_server_metadata(as_json=True)["name"] == "engine"
    meta = triton.get_model_metadata("gan", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "digit", "datatype": "INT64", "shape": ["-1"]}]
    assert meta["outputs"][0]["shape"] == ["-1", "1", "8", "8"]
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_infer_classifier_bytes_in_fp32_and_labels_out(triton):
    result = triton.infer("clf", [_bytes_input("text", [b"abc", b"hello"])])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    labels = ["neg", "neu", "pos"]
    assert [x.decode() for x in result.as_numpy("label")] == [labels[i] for i in probs.argmax(1)]


def test_infer_language_model_with_parameters(triton):
    inputs = [_bytes_input("text_input", [b"hello", b"abc"])]
    result = triton.infer(
        "lm", inputs, parameters={"max_tokens": 5, "temperature": 0.0}, request_id="kserve-1"
    )
    texts = [x.decode() for x in result.as_numpy("text_output")]
    assert [len(t) for t in texts] == [5, 5]
    assert list(result.as_numpy("finish_reason")) == [b"length", b"length"]
    assert list(result.as_numpy("completion_tokens")) == [5, 5]
    assert result.get_response().id == "kserve-1"
    only = triton.infer(
        "lm",
        inputs[:1],
        parameters={"max_tokens": 5, "temperature": 0},
        outputs=[tg.InferRequestedOutput("text_output")],
    )
    assert only.as_numpy("text_output")[0].decode() == texts[0]
    assert only.as_numpy("finish_reason") is None


def test_infer_gan_int32_digits_to_fp32_images(triton):
    digits = tg.InferInput("digit", [3], "INT32")
    digits.set_data_from_numpy(np.array([0, 5, 9], dtype=np.int32))
    result = triton.infer("gan", [digits], parameters={"seed": 4})
    images = result.as_numpy("image")
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.float32
    assert np.abs(images).max() <= 1.0
    again = triton.infer("gan", [digits], parameters={"seed": 4}).as_numpy("image")
    np.testing.assert_array_equal(images, again)


def test_streamed_generation_one_response_per_chunk(triton):
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        triton.async_stream_infer(
            "lm",
            [_bytes_input("text_input", [b"hello"])],
            request_id="s1",
            enable_empty_final_response=True,
            parameters={"max_tokens": 4, "temperature": 0.0},
        )
        pieces, final = [], None
        while final is None:
            result, error = responses.get(timeout=10)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            if response.parameters["triton_final_response"].bool_param:
                final = response
            else:
                pieces.append(result.as_numpy("text_output")[0].decode())
        assert len(pieces) == 4 and not final.outputs  # the empty final response
        # An error on the stream comes back as a response; the stream stays usable.
        triton.async_stream_infer("nope", [_bytes_input("text_input", [b"x"])])
        result, error = responses.get(timeout=10)
        assert result is None and "NOT_FOUND" in str(error)
        triton.async_stream_infer(
            "lm",
            [_bytes_input("text_input", [b"hello"])],
            parameters={"max_tokens": 2, "temperature": 0.0},
        )
        texts = []
        while True:
            result, error = responses.get(timeout=10)
            assert error is None
            texts.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                assert result.as_numpy("finish_reason")[0] == b"length"
                break
        assert "".join(texts) == "".join(pieces)[:2]
    finally:
        triton.stop_stream()


def test_streamed_requests_on_one_stream_run_concurrently(triton):
    responses: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i in range(8):
            triton.async_stream_infer(
                "lm",
                [_bytes_input("text_input", [b"ab"])],
                request_id=f"c{i}",
                parameters={"max_tokens": 3},
            )
        finals = set()
        while len(finals) < 8:
            result, error = responses.get(timeout=10)
            assert error is None
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                finals.add(response.id)
        assert finals == {f"c{i}" for i in range(8)}
    finally:
        triton.stop_stream()


def _infer_error(kserve_stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        kserve_stub.ModelInfer(request)
    return info.value


def _request(model: str, *tensors, raw=None, **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, inputs=list(tensors))
    if raw is not None:
        request.raw_input_contents.extend(raw)
    for key, value in params.items():
        setattr(
            request.parameters[key],
            type(value)
            .__name__.replace("float", "double")
            .replace("int", "int64")
            .replace("str", "string")
            + "_param",
            value,
        )
    return request


def _tensor(name, datatype, shape, **contents):
    return pb.ModelInferRequest.InferInputTensor(
        name=name,
        datatype=datatype,
        shape=shape,
        contents=pb.InferTensorContents(**contents) if contents else None,
    )


@pytest.mark.parametrize(
    ("request_", "detail"),
    [
        (_request("clf", _tensor("txt", "BYTES", [1], bytes_contents=[b"a"])), "no input 'txt'"),
        (_request("clf"), "input 'text' is missing"),
        (
            _request("clf", _tensor("text", "FP32", [1], fp32_contents=[1.0])),
            "input 'text' is FP32",
        ),
        (_request("clf", _tensor("text", "BYTES", [2], bytes_contents=[b"a"])), "needs 2"),
        (
            _request("clf", _tensor("text", "BYTES", [1, 2], bytes_contents=[b"a", b"b"])),
            "expected [N] or [N, 1]",
        ),
        (
            _request("clf", _tensor("text", "BYTES", [-1], bytes_contents=[b"a"])),
            "negative dimension",
        ),
        (
            _request("clf", _tensor("text", "BYTES", [1]), raw=[b"\x09\x00\x00\x00ab"]),
            "claims 9 bytes",
        ),
        (
            _request("clf", _tensor("text", "BYTES", [1 << 40]), raw=[b"\x01\x00\x00\x00a"]),
            "cannot hold",
        ),
        (
            _request("gan", _tensor("digit", "INT64", [0, 1 << 40, 1 << 40], int64_contents=[])),
            "too large to represent",
        ),
        (_request("clf", _tensor("text", "NOPE", [1])), "unknown datatype"),
        (_request("gan", _tensor("digit", "INT64", [2]), raw=[b"\x00" * 12]), "need 2 x 8"),
        (_request("gan", _tensor("digit", "INT64", [1], int64_contents=[12])), "digits 0 to 9"),
        (_request("gan", _tensor("digit", "INT64", [1], int64_contents=[1]), seed=-3), "seed"),
        (
            _request(
                "lm", _tensor("text_input", "BYTES", [1], bytes_contents=[b"hi"]), temperature=-1.0
            ),
            "temperature",
        ),
        (
            _request(
                "lm", _tensor("text_input", "BYTES", [1], bytes_contents=[b"hi"]), max_tokens=2.5
            ),
            "must be an integer",
        ),
        (
            _request(
                "lm", _tensor("text_input", "BYTES", [1], bytes_contents=[b"hi"]), stop="[1, 2"
            ),
            "not a JSON list",
        ),
        (
            _request("lm", _tensor("text_input", "BYTES", [1], bytes_contents=[b"\xff"])),
            "not UTF-8",
        ),
        (
            _request("lm", _tensor("text_input", "BYTES", [1], bytes_contents=[b""])),
            "prompt is empty",
        ),
    ],
)
def test_model_infer_refuses_bad_tensors_and_parameters(kserve_stub, request_, detail):
    error = _infer_error(kserve_stub, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in error.details()


def test_unknown_requested_output_is_invalid(kserve_stub):
    request = _request("clf", _tensor("text", "BYTES", [1], bytes_contents=[b"a"]))
    request.outputs.add(name="logits")
    error = _infer_error(kserve_stub, request)
    assert (
        error.code() == grpc.StatusCode.INVALID_ARGUMENT and "no output 'logits'" in error.details()
    )


def test_stream_errors_carry_the_request_id(kserve_stub):
    bad = _request("nope", _tensor("text_input", "BYTES", [1], bytes_contents=[b"a"]))
    bad.id = "bad-1"
    good = _request("clf", _tensor("text", "BYTES", [1], bytes_contents=[b"a"]))
    good.id = "good-1"
    responses = list(kserve_stub.ModelStreamInfer(iter([bad, good]), timeout=10))
    errors = [r for r in responses if r.error_message]
    assert [(r.infer_response.id, r.error_message[:11]) for r in errors] == [
        ("bad-1", "[NOT_FOUND]")
    ]
    finals = [r.infer_response for r in responses if not r.error_message]
    assert [r.id for r in finals] == ["good-1"]
    assert finals[0].parameters["triton_final_response"].bool_param
