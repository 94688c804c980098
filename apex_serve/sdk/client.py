"""Synchronous client of the gateway's gRPC API."""

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from apex_serve.sdk import messages
from apex_serve.sdk.errors import from_rpc_error
from apex_serve.sdk.messages import (
    ChatMessage,
    ChatOptions,
    Chunk,
    Completion,
    GenerateResult,
    ModelInfo,
    ServerInfo,
    StructuredOutputs,
)
from apex_serve.sdk.options import RETRYABLE, ClientOptions, sampling_from
from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc

T = TypeVar("T")


class Client:
    """`with Client(address, api_key=...) as c: c.generate("Hello", max_tokens=16)`."""

    def __init__(self, address: str = "127.0.0.1:50051", **options: Any) -> None:
        self.options = ClientOptions(address=address, **options)
        o = self.options
        self._channel = (
            grpc.secure_channel(o.address, o.credentials()) if o.secure else grpc.insecure_channel(o.address)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def stream(
        self,
        prompt: str | Sequence[ChatMessage],
        *,
        sampling: SamplingParams | None = None,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        chat: ChatOptions | None = None,
        n: int = 1,
        structured_outputs: StructuredOutputs | None = None,
        **sampling_fields: Any,
    ) -> Iterator[Chunk | Completion]:
        """Chunks as they are generated, then one Completion (with n samples: each sample's, carrying its index).
        Closing the iterator cancels the request on the server. A list of ChatMessage is rendered with the model's
        chat template, as `chat` says (default: with the generation prompt)."""
        request = messages.generate_request(
            prompt, sampling_from(sampling, sampling_fields), stop, include_stop_str_in_output, model, request_id,
            chat, n, structured_outputs,
        )
        for attempt in range(self.options.max_retries + 1):
            call = self._stub.Generate(request, timeout=timeout_s or self.options.timeout_s,
                                       metadata=self.options.metadata())
            received = False
            try:
                for msg in call:
                    received = True
                    yield messages.parse_response(msg)
                return
            except grpc.RpcError as err:
                if received or err.code() not in RETRYABLE or attempt == self.options.max_retries:
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()
            time.sleep(self.options.backoff(attempt))

    def generate(self, prompt: str | Sequence[ChatMessage], **kwargs: Any) -> GenerateResult:
        """The whole completion at once (the same call as `stream`)."""
        return messages.collect(list(self.stream(prompt, **kwargs)))

    def samples(self, prompt: str | Sequence[ChatMessage], n: int, **kwargs: Any) -> list[GenerateResult]:
        """n samples of the prompt in one call, in index order."""
        return messages.collect_samples(list(self.stream(prompt, n=n, **kwargs)))

    def abort(self, request_id: str) -> bool:
        reply = self._unary(self._stub.Abort, gateway_pb2.AbortGenerateRequest(request_id=request_id))
        return reply.aborted

    def model_info(self) -> ModelInfo:
        return messages.model_info_from_pb(self._unary(self._stub.GetModelInfo, gateway_pb2.GetModelInfoRequest()))

    def server_info(self) -> ServerInfo:
        return messages.server_info_from_pb(self._unary(self._stub.GetServerInfo, gateway_pb2.GetServerInfoRequest()))

    def live(self) -> bool:
        return self._unary(self._stub.ServerLive, gateway_pb2.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._unary(self._stub.ServerReady, gateway_pb2.ServerReadyRequest()).ready

    def model_ready(self, name: str = "") -> bool:
        return self._unary(self._stub.ModelReady, gateway_pb2.ModelReadyRequest(name=name)).ready

    def _unary(self, method: Callable[..., T], request: object) -> T:
        """Every unary call here is idempotent, so UNAVAILABLE is retried with backoff."""
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == self.options.max_retries:
                    raise from_rpc_error(err) from None
            time.sleep(self.options.backoff(attempt))
            attempt += 1

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
