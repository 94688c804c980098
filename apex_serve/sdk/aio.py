"""asyncio client of the gateway's gRPC API (same methods as the sync Client, awaitable)."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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


class AsyncClient:
    """`async with AsyncClient(address) as c: async for event in c.stream("Hi"): ...`."""

    def __init__(self, address: str = "127.0.0.1:50051", **options: Any) -> None:
        self.options = ClientOptions(address=address, **options)
        o = self.options
        self._channel = (
            grpc.aio.secure_channel(o.address, o.credentials()) if o.secure else grpc.aio.insecure_channel(o.address)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def stream(
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
    ) -> AsyncIterator[Chunk | Completion]:
        """Chunks, then one Completion (with n samples: each sample's, carrying its index); leaving the loop early
        cancels the request on the server."""
        request = messages.generate_request(
            prompt, sampling_from(sampling, sampling_fields), stop, include_stop_str_in_output, model, request_id,
            chat, n, structured_outputs,
        )
        for attempt in range(self.options.max_retries + 1):
            call = self._stub.Generate(request, timeout=timeout_s or self.options.timeout_s,
                                       metadata=self.options.metadata())
            received = False
            try:
                async for msg in call:
                    received = True
                    yield messages.parse_response(msg)
                return
            except grpc.aio.AioRpcError as err:
                if received or err.code() not in RETRYABLE or attempt == self.options.max_retries:
                    raise from_rpc_error(err) from None
            finally:
                call.cancel()
            await asyncio.sleep(self.options.backoff(attempt))

    async def generate(self, prompt: str | Sequence[ChatMessage], **kwargs: Any) -> GenerateResult:
        return messages.collect([event async for event in self.stream(prompt, **kwargs)])

    async def samples(self, prompt: str | Sequence[ChatMessage], n: int, **kwargs: Any) -> list[GenerateResult]:
        """n samples of the prompt in one call, in index order."""
        return messages.collect_samples([event async for event in self.stream(prompt, n=n, **kwargs)])

    async def abort(self, request_id: str) -> bool:
        reply = await self._unary(self._stub.Abort, gateway_pb2.AbortGenerateRequest(request_id=request_id))
        return reply.aborted

    async def model_info(self) -> ModelInfo:
        reply = await self._unary(self._stub.GetModelInfo, gateway_pb2.GetModelInfoRequest())
        return messages.model_info_from_pb(reply)

    async def server_info(self) -> ServerInfo:
        reply = await self._unary(self._stub.GetServerInfo, gateway_pb2.GetServerInfoRequest())
        return messages.server_info_from_pb(reply)

    async def live(self) -> bool:
        return (await self._unary(self._stub.ServerLive, gateway_pb2.ServerLiveRequest())).live

    async def ready(self) -> bool:
        return (await self._unary(self._stub.ServerReady, gateway_pb2.ServerReadyRequest())).ready

    async def model_ready(self, name: str = "") -> bool:
        return (await self._unary(self._stub.ModelReady, gateway_pb2.ModelReadyRequest(name=name))).ready

    async def _unary(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        """Every unary call here is idempotent, so UNAVAILABLE is retried with backoff."""
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.options.timeout_s, metadata=self.options.metadata())
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRYABLE or attempt == self.options.max_retries:
                    raise from_rpc_error(err) from None
            await asyncio.sleep(self.options.backoff(attempt))
            attempt += 1

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
