"""The apex-serve client SDK: grpcio and protobuf only (no torch), sync and asyncio.

    from apex_serve.sdk import Client
    with Client("127.0.0.1:50051") as client:
        for event in client.stream("Once upon a time", max_tokens=32):
            ...
"""

from apex_serve.sdk.aio import AsyncClient
from apex_serve.sdk.client import Client
from apex_serve.sdk.errors import (
    ApexServeError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from apex_serve.sdk.messages import (
    ChatMessage,
    ChatOptions,
    Chunk,
    Completion,
    GenerateResult,
    StructuredOutputs,
    ToolCall,
)
from apex_serve.types import FinishReason, SamplingParams, TokenLogprob

__all__ = [
    "ApexServeError", "AsyncClient", "CancelledError", "ChatMessage", "ChatOptions", "Chunk", "Client", "Completion",
    "DeadlineExceededError", "FinishReason", "GenerateResult", "InternalError", "InvalidArgumentError",
    "NotFoundError", "ResourceExhaustedError", "SamplingParams", "StructuredOutputs", "TokenLogprob", "ToolCall", "UnauthenticatedError",
    "UnavailableError",
]
