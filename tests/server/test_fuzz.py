"""Thousands of random and malformed requests: every answer is a proper status, nothing hangs.

Requests are random protobuf messages (names, prompts, extreme sampling values, tensors with
random datatypes, shapes and contents) and random bytes sent straight to every method. Allowed
answers are OK and the statuses a caller can act on; INTERNAL, UNKNOWN, UNAVAILABLE or a
deadline (a hang) fail the test. Figures are printed (run with -s to see them).
"""

from __future__ import annotations

import collections
import os
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.proto import engine_pb2 as epb
from engine.proto import engine_pb2_grpc, grpc_predict_v2_pb2_grpc
from engine.proto import grpc_predict_v2_pb2 as kpb
from engine.server.serving import Limits
from tests.server.conftest import start_server

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
TIMEOUT = 10.0  # per call: far above any honest answer here, so hitting it means a hang
# Examples per test; five fuzzing tests (streams carry up to four requests each). Raise it for
# a longer run: ENGINE_FUZZ_EXAMPLES=2000 pytest tests/server/test_fuzz.py -s
EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TALLY: collections.Counter = collections.Counter()

served = st.sampled_from(["lm", "clf", "gan"])
models = st.one_of(
    served, served, served, served, st.sampled_from(["", "LM", "lm ", "../lm"]), st.text(max_size=8)
)
small_text = st.text(max_size=80)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 1e-9])
ints = st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 300)
# Sampling values: in range (the request should succeed) or anything at all.
RANGES = {
    "temperature": (0, 2),
    "top_p": (0.01, 1),
    "min_p": (0, 1),
    "repetition_penalty": (0.5, 2),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
}


@pytest.fixture(scope="module")
def fuzz_server():
    srv = start_server(limits=Limits(max_running=8, max_waiting=8, max_batch=64))
    channel = grpc.insecure_channel(srv.target)
    yield srv, channel
    channel.close()
    srv.stop()
    total = sum(TALLY.values())
    print(
        f"\nfuzz: {total} requests; statuses: "
        + ", ".join(f"{code}={n}" for code, n in TALLY.most_common())
    )


def _record(fn) -> None:
    start = time.monotonic()
    code, detail = grpc.StatusCode.OK, ""
    try:
        result = fn()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            for _ in result:
                pass
    except grpc.RpcError as exc:
        code, detail = exc.code(), exc.details()
    TALLY[code.name] += 1
    assert code in ALLOWED, f"{code}: {detail}"
    assert time.monotonic() - start < TIMEOUT


@st.composite
def sampling(draw):
    params = epb.SamplingParams()
    wild = draw(st.integers(0, 3)) == 0  # a quarter of requests take out-of-range values
    for name, (low, high) in RANGES.items():
        if draw(st.booleans()):
            setattr(params, name, draw(floats if wild else st.floats(low, high)))
    for name, high in (("top_k", 30), ("max_tokens", 8), ("logprobs", 5)):
        if draw(st.booleans()):
            setattr(params, name, draw(ints if wild else st.integers(1, high)))
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    params.stop.extend(draw(st.lists(st.text(min_size=int(not wild), max_size=4), max_size=3)))
    params.stop_token_ids.extend(draw(st.lists(ints if wild else st.integers(0, 31), max_size=3)))
    params.ignore_eos = draw(st.booleans())
    return params


@SETTINGS
@given(
    model=models,
    prompt=small_text,
    params=sampling(),
    rid=st.sampled_from(["", "", "req-1"]) | st.text(max_size=5),
)
def test_fuzz_generate(fuzz_server, model, prompt, params, rid):
    _, channel = fuzz_server
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    request = epb.GenerateRequest(model=model, prompt=prompt, params=params, request_id=rid)
    _record(lambda: stub.Generate(request, timeout=TIMEOUT))


@SETTINGS
@given(
    model=models,
    texts=st.lists(small_text, max_size=70),
    digits=st.lists(ints, max_size=70),
    seed=st.none() | st.integers(0, 2**64 - 1),
    which=st.sampled_from(["Classify", "SampleImages", "Tokenize", "ModelInfo"]),
)
def test_fuzz_other_engine_methods(fuzz_server, model, texts, digits, seed, which):
    _, channel = fuzz_server
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    if which == "Classify":
        request = epb.ClassifyRequest(model=model, texts=texts)
    elif which == "SampleImages":
        request = epb.SampleImagesRequest(model=model, digits=digits)
        if seed is not None:
            request.seed = seed
    elif which == "Tokenize":
        request = epb.TokenizeRequest(model=model, text="".join(texts))
    else:
        request = epb.ModelInfoRequest(model=model, version=str(seed or ""))
    _record(lambda: getattr(stub, which)(request, timeout=TIMEOUT))


DATATYPES = ["BYTES", "INT64", "INT32", "FP32", "FP16", "BOOL", "UINT8", "FP64", "BF16", "x"]


@st.composite
def infer_request(draw):
    request = kpb.ModelInferRequest(model_name=draw(models), id=draw(st.text(max_size=5)))
    name = st.sampled_from(["text_input", "text", "digit", "image", ""]) | st.text(max_size=5)
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(name=draw(name), datatype=draw(st.sampled_from(DATATYPES)))
        tensor.shape.extend(draw(st.lists(st.integers(-2, 2**40) | st.integers(0, 4), max_size=3)))
        if raw:
            request.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            contents = tensor.contents
            contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=12), max_size=4)))
            contents.int64_contents.extend(draw(st.lists(ints, max_size=4)))
            contents.int_contents.extend(
                draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4))
            )
            contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=4)))
    for key in draw(
        st.lists(
            st.sampled_from(
                ["temperature", "max_tokens", "seed", "stop", "top_k", "ignore_eos", "bogus"]
            ),
            max_size=3,
        )
    ):
        param = request.parameters[key]
        kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64"]))
        value = {
            "bool": st.booleans(),
            "int64": ints,
            "string": st.text(max_size=6),
            "double": floats,
            "uint64": st.integers(0, 2**64 - 1),
        }[kind]
        setattr(param, f"{kind}_param", draw(value))
    for _ in range(draw(st.integers(0, 1))):
        request.outputs.add(name=draw(name))
    return request


@SETTINGS
@given(request=infer_request())
def test_fuzz_model_infer(fuzz_server, request):
    _, channel = fuzz_server
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    _record(lambda: stub.ModelInfer(request, timeout=TIMEOUT))


@SETTINGS
@given(requests=st.lists(infer_request(), max_size=4))
def test_fuzz_model_stream_infer(fuzz_server, requests):
    """A stream never fails as a whole: each bad request gets an error_message response."""
    _, channel = fuzz_server
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT))
    ended = 0
    for response in responses:
        if response.error_message:
            code = response.error_message[1 : response.error_message.index("]")]
            assert code in {c.name for c in ALLOWED}, response.error_message
            TALLY[code] += 1
            ended += 1
        elif response.infer_response.parameters["triton_final_response"].bool_param:
            TALLY["OK"] += 1
            ended += 1
    assert ended == len(requests)  # every request of the stream got its last answer


METHODS = [
    ("/engine.v1.EngineService/Generate", "unary_stream"),
    ("/engine.v1.EngineService/Classify", "unary_unary"),
    ("/engine.v1.EngineService/SampleImages", "unary_unary"),
    ("/engine.v1.EngineService/ModelInfo", "unary_unary"),
    ("/engine.v1.EngineService/Tokenize", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelInfer", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelMetadata", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelReady", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelStreamInfer", "stream_stream"),
]


@SETTINGS
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_fuzz_raw_bytes(fuzz_server, method, payload):
    """Arbitrary bytes as a request: parsed garbage or INVALID_ARGUMENT, never INTERNAL."""
    _, channel = fuzz_server
    path, kind = method
    call = getattr(channel, kind)(path)
    if kind == "stream_stream":
        _record(lambda: call(iter([payload]), timeout=TIMEOUT))
    else:
        _record(lambda: call(payload, timeout=TIMEOUT))


def test_server_is_healthy_after_the_fuzzing(fuzz_server):
    srv, channel = fuzz_server
    stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(kpb.ServerLiveRequest()).live
    lm = srv.models["lm"]
    assert srv.run(lm.kv_blocks_used) == 0
    assert srv.run(lambda: srv.server.serving.queues["lm"].running) == 0
