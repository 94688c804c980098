"""Connection options shared by the sync and asyncio clients."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from apex_serve import errors
from apex_serve.sdk.errors import InvalidArgumentError
from apex_serve.types import SamplingParams

# Generate is retried only when it failed before the server sent anything, and only on these.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ClientOptions:
    address: str = "127.0.0.1:50051"
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None: the system roots (with tls=True)
    timeout_s: float | None = None  # default deadline of every call
    max_retries: int = 2
    backoff_s: float = 0.1

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries: must be >= 0, got {self.max_retries}")

    @property
    def secure(self) -> bool:
        return self.tls or self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def backoff(self, attempt: int) -> float:
        return self.backoff_s * 2**attempt


def sampling_from(sampling: SamplingParams | None, fields: Mapping[str, Any]) -> SamplingParams:
    """`sampling`, or one built from keyword fields; bad values raise InvalidArgumentError locally."""
    if sampling is not None and fields:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "give sampling or sampling fields, not both")
    try:
        return sampling or SamplingParams(**fields)
    except errors.InvalidArgument as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    except TypeError as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
