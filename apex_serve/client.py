"""A small synchronous client of the gateway's gRPC API (the full SDK comes with the gateway issue)."""

from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from apex_serve import convert
from apex_serve.types import FinishReason, SamplingParams
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True)
class TextChunk:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    request_id: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class GatewayClient:
    def __init__(self, address: str = "127.0.0.1:50051") -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(
        self, prompt: str, sampling: SamplingParams | None = None, model: str = "", timeout_s: float | None = None
    ) -> Iterator[TextChunk | Completion]:
        """Streams text chunks, then one Completion. gRPC errors raise grpc.RpcError."""
        request = gateway_pb2.GenerateRequest(
            model=model, prompt=prompt, sampling=convert.sampling_to_pb(sampling or SamplingParams())
        )
        for msg in self._stub.Generate(request, timeout=timeout_s):
            kind = msg.WhichOneof("response")
            if kind == "chunk":
                yield TextChunk(msg.chunk.text, tuple(msg.chunk.token_ids))
            elif kind == "complete":
                c = msg.complete
                yield Completion(
                    c.request_id,
                    convert.finish_reason_from_pb(c.finish_reason),
                    c.usage.prompt_tokens,
                    c.usage.completion_tokens,
                )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
