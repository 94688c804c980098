"""gRPC plumbing shared by every service: server construction, health, reflection, the one
exception interceptor, Unix-socket binding, graceful stop on SIGTERM, and health waits."""

import asyncio
import inspect
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from apex_serve import errors, tracing

logger = logging.getLogger(__name__)

_STATUS_FOR_ERROR: dict[type[errors.ApexError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

ERROR_KIND_KEY = "apex-error-kind"  # trailing metadata naming an ApexError's kind

REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _STATUS_FOR_ERROR.items():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """The status code, details and ApexError kind (empty when none) a call that failed with exc answers with."""
    return status_for(exc), _details(exc), getattr(exc, "kind", "")


def error_trailers(kind: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that names an ApexError's kind to the caller (none for an error without one)."""
    return ((ERROR_KIND_KEY, kind),) if kind else ()


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error(code: grpc.StatusCode | int, details: str, kind: str = "") -> grpc.aio.AioRpcError:
    """The error a call that failed so raises (code as a StatusCode or its number), for a failure a stream's message
    reports: the same code, details and apex-error-kind trailing metadata."""
    if isinstance(code, int):
        code = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*error_trailers(kind)), details)


def error_kind(exc: grpc.aio.AioRpcError) -> str:
    """The ApexError kind the server named in the call's trailing metadata ("" when none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KIND_KEY:
            return value if isinstance(value, str) else value.decode()
    return ""


def _details(exc: BaseException) -> str:
    return exc.details() or "" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors (and errors of downstream calls) to status codes, in one place."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


class _Undecodable:
    """A request message the method's deserializer could not parse (grpc.aio would answer UNKNOWN and log an
    ERROR with a traceback per call); the wrapped behaviour answers INVALID_ARGUMENT instead."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return deserialize


async def _refuse_undecodable(context: grpc.aio.ServicerContext, method: str, request: _Undecodable) -> None:
    logger.debug("%s: malformed request message: %s", method, request.error)
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: not a valid {method.rsplit('/', 1)[-1]} request message ({type(request.error).__name__}: "
        f"{request.error})",
    )


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    code, details, kind = error_status(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", method)
    elif code == grpc.StatusCode.UNIMPLEMENTED:
        logger.info("%s: not implemented", method)
    await context.abort(code, details, error_trailers(kind))


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _refuse_undecodable(context, method, request)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Undecodable):
            await _refuse_undecodable(context, method, request)
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):  # a handler that writes with context.write()
                await result
                return
            async for item in result:
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return wrapper


def create_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (), max_receive_bytes: int | None = None
) -> grpc.aio.Server:
    """A grpc.aio server; `interceptors` run before the exception interceptor, after the tracing one (when on), so
    a call's SERVER span covers them and records the status they answer with. max_receive_bytes: the largest request
    message read (a larger one is answered RESOURCE_EXHAUSTED); None: the internal services' 64 MiB."""
    options = CHANNEL_OPTIONS
    if max_receive_bytes is not None:
        options = [(k, v) for k, v in CHANNEL_OPTIONS if k != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    return grpc.aio.server(
        interceptors=[*tracing.server_interceptors(), *interceptors, ExceptionInterceptor()], options=options
    )


def channel(address: str) -> grpc.aio.Channel:
    """A channel to an internal service; its calls carry the trace context when tracing is on."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> str:
    """Binds a `unix://` path (stale socket removed, parent created 0700) or host:port (TLS when
    credentials are given). Returns the address clients should dial (the real port for port 0)."""
    if address.startswith("unix://"):
        path = Path(address.removeprefix("unix://"))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        server.add_insecure_port(address)
        return address
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


class HealthServicer(health.aio.HealthServicer):
    """grpc_health's servicer with List answered (the library leaves List to the generated base class)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            }
        )


def add_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves grpc.reflection.v1 and v1alpha, listing `service_names` and v1alpha's own name.

    v1's messages are wire-identical to v1alpha's (same fields and numbers) and grpcio-reflection ships only v1alpha,
    so one servicer answers both, with v1alpha's (de)serializers. v1 is served but not listed: its descriptor is not
    in the pool, and every listed service must resolve."""
    servicer = reflection.aio.ReflectionServicer([*service_names, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE, {"ServerReflectionInfo": v1_info}),)
    )


class ServiceRunner:
    """Health + reflection for a set of services, and a run-until-SIGTERM lifecycle."""

    def __init__(self, server: grpc.aio.Server, service_names: Iterable[str]) -> None:
        self.server = server
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self._names = ["", *service_names]
        add_reflection(server, [*self._names[1:], health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
        self._stop = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._names:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(
        self,
        grace_s: float = 5.0,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        drain_alongside: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Starts, reports SERVING, waits for SIGTERM/SIGINT (or request_stop), then goes
        NOT_SERVING, lets in-flight calls finish for up to grace_s (while drain_alongside drains
        another front end at the same time), and runs on_stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.server.start()
        await self.set_serving(True)
        await self._stop.wait()
        logger.info("stopping: NOT_SERVING, draining for up to %.1fs", grace_s)
        await self.set_serving(False)
        drains = [self.server.stop(grace_s)] + ([drain_alongside()] if drain_alongside is not None else [])
        await asyncio.gather(*drains)
        if on_stop is not None:
            await on_stop()


# A service that is starting refuses connections until it listens; gRPC's default reconnect backoff (1 s, growing)
# would then notice it up to seconds late. The health poll reconnects every _HEALTH_POLL_S instead.
_HEALTH_POLL_S = 0.1
_HEALTH_POLL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 100)]


async def wait_healthy(address: str, timeout_s: float = 60.0, service: str = "") -> None:
    """Polls grpc.health.v1 until SERVING; raises TimeoutError naming the address."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address, options=_HEALTH_POLL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s")
            await asyncio.sleep(_HEALTH_POLL_S)


def unix_address(run_dir: str | os.PathLike[str], name: str) -> str:
    return f"unix://{Path(run_dir).resolve() / f'{name}.sock'}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free now (for tests and benchmarks that start a stack)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
