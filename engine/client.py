"""A small Python client for the engine.v1 API (bearer token and TLS), used by ``engine client``.

    with EngineClient("localhost:50051", token="s3cret") as client:
        for piece in client.generate_stream("lm", "def main(", max_tokens=32):
            print(piece.text, end="", flush=True)

Every failure surfaces as :class:`ClientError` carrying the gRPC status code and the server's
detail, so the CLI prints one line instead of a traceback. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from engine.errors import EngineError
from engine.proto import engine_pb2 as pb
from engine.proto import engine_pb2_grpc
from engine.wire import SAMPLING_SCALAR_FIELDS


class ClientError(EngineError):
    """A call failed; ``code`` is the gRPC status (e.g. NOT_FOUND) and the message its detail."""

    def __init__(self, code: grpc.StatusCode | None, detail: str):
        name = code.name if code is not None else "ERROR"
        super().__init__(f"{name}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class Classified:
    """One text's predicted label and every label's probability."""

    label: str
    probabilities: dict[str, float]


def read_token(token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The bearer token given directly or as the first line of ``token_file`` (None if neither)."""
    if token:
        return token
    if token_file:
        try:
            value = Path(token_file).read_text().strip()
        except OSError as exc:
            raise EngineError(f"cannot read the auth token file {token_file}: {exc}") from None
        if not value:
            raise EngineError(f"the auth token file {token_file} is empty")
        return value
    return None


def sampling_params(**values: Any) -> pb.SamplingParams:
    """An engine.v1.SamplingParams from keyword values; None leaves a field at its default."""
    msg = pb.SamplingParams()
    for name in SAMPLING_SCALAR_FIELDS:
        if values.get(name) is not None:
            setattr(msg, name, values[name])
    msg.stop.extend(values.get("stop") or ())
    msg.stop_token_ids.extend(values.get("stop_token_ids") or ())
    msg.ignore_eos = bool(values.get("ignore_eos", False))
    return msg


class EngineClient:
    """A blocking client of one server; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
        timeout: float | None = None,
    ):
        """Connect to ``target`` (host:port); TLS if ``tls`` or a CA/cert PEM is given."""
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        if tls or tls_ca is not None:
            roots = tls_ca
            if isinstance(tls_ca, (str, Path)):
                try:
                    roots = Path(tls_ca).read_bytes()
                except OSError as exc:
                    raise EngineError(f"cannot read the TLS CA file {tls_ca}: {exc}") from None
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = engine_pb2_grpc.EngineServiceStub(self.channel)

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until the server accepts connections (it binds once its models are loaded).

        Raises ClientError(UNAVAILABLE) after ``timeout`` seconds.
        """
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            detail = f"no server at {self.target} after waiting {timeout:g} s"
            raise ClientError(grpc.StatusCode.UNAVAILABLE, detail) from None

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or str(exc)) from None

    # -- the API -------------------------------------------------------------------------------
    def generate_stream(self, model: str, prompt: str, **params: Any) -> Iterator[Any]:
        """Yield GenerateResponse chunks as they arrive; closing the iterator cancels the call."""
        request = pb.GenerateRequest(model=model, prompt=prompt, params=sampling_params(**params))
        call = self._call("Generate", request)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise ClientError(exc.code(), exc.details() or str(exc)) from None
        finally:
            call.cancel()  # a no-op once finished; aborts the generation if we stop early

    def generate(self, model: str, prompt: str, **params: Any) -> tuple[str, str]:
        """The whole completion and its finish reason ("stop", "length" or "abort")."""
        parts, reason = [], "abort"
        for chunk in self.generate_stream(model, prompt, **params):
            parts.append(chunk.text)
            if chunk.finish_reason:
                reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_")
        return "".join(parts), reason.lower()

    def classify(self, model: str, texts: Sequence[str]) -> list[Classified]:
        """The label and label probabilities of each text."""
        response = self._call("Classify", pb.ClassifyRequest(model=model, texts=list(texts)))
        return [
            Classified(r.label, dict(zip(response.labels, r.probabilities)))
            for r in response.results
        ]

    def sample_images(self, model: str, digits: Sequence[int], seed: int | None = None) -> Any:
        """A SampleImagesResponse: one image per digit, PNG bytes and raw pixels."""
        request = pb.SampleImagesRequest(model=model, digits=list(digits))
        if seed is not None:
            request.seed = seed
        return self._call("SampleImages", request)

    def models(self) -> list[Any]:
        """ModelSummary of every served model."""
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def model_info(self, model: str) -> Any:
        """ModelInfoResponse of one model."""
        return self._call("ModelInfo", pb.ModelInfoRequest(model=model))

    def tokenize(self, model: str, text: str) -> list[int]:
        """Token ids of ``text`` under ``model``'s tokenizer."""
        return list(self._call("Tokenize", pb.TokenizeRequest(model=model, text=text)).token_ids)
