"""Typed exceptions of the SDK, one per status a caller handles differently."""

import grpc


class ApexServeError(Exception):
    """A call failed; `code` is the gRPC status, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgumentError(ApexServeError):
    """A request field is out of range; the message names the field and the limit."""


class NotFoundError(ApexServeError):
    """Unknown model."""


class UnauthenticatedError(ApexServeError):
    """Missing or wrong API key."""


class ResourceExhaustedError(ApexServeError):
    """The server is at its bound of requests in flight, or the prompt is too large."""


class UnavailableError(ApexServeError):
    """The server cannot be reached or is shutting down."""


class DeadlineExceededError(ApexServeError):
    """The call's deadline passed."""


class CancelledError(ApexServeError):
    """The call was cancelled."""


class InternalError(ApexServeError):
    """Anything else: a server fault."""


_BY_CODE: dict[grpc.StatusCode, type[ApexServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def error_for(code: grpc.StatusCode, message: str) -> ApexServeError:
    return _BY_CODE.get(code, InternalError)(code, message)


def from_rpc_error(err: grpc.RpcError) -> ApexServeError:
    return error_for(err.code(), err.details() or "")  # type: ignore[attr-defined]


def status_code(value: int) -> grpc.StatusCode:
    """The StatusCode of a numeric code (as the `error` message of a stream carries it)."""
    return next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
