"""Runs the HTTP app with uvicorn as a task of the gateway's event loop; the gateway owns the signals.

Bounds at the edge, so that idle or half-open connections cannot starve /health: a connection gets
http_header_timeout_s to send a whole request head (uvicorn has no such timeout), at most max_http_connections are
open (a new one closes the one that has waited longest for its request head), heads are at most
http_max_header_bytes (h11's bound; httptools has none, so the h11 protocol is used), and uvicorn's repeated
warnings are logged once per interval."""

import asyncio
import logging
import socket
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from apex_serve import embedded_http
from gateway.config import GatewayConfig
from gateway.drain import CUT_GRACE_S
from gateway.generation import Generator
from gateway.http_api.app import create_app

logger = logging.getLogger(__name__)


LOG_REPEAT_INTERVAL_S = 10.0


class RepeatFilter(logging.Filter):
    """Lets the first record of a kind (logger, level, message template, exception type) through, then drops the
    same kind for interval_s; the next one that passes says how many were dropped."""

    def __init__(self, interval_s: float = LOG_REPEAT_INTERVAL_S) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._seen: dict[tuple[object, ...], tuple[float, int]] = {}  # kind -> (when let through, dropped since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, record.msg, record.exc_info[0] if record.exc_info else None)
        now = time.monotonic()
        last = self._seen.get(kind)
        if last is not None and now - last[0] < self._interval_s:
            self._seen[kind] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.msg = f"{record.msg} ({last[1]} more like it in the last {now - last[0]:.0f}s not logged)"
        if len(self._seen) > 1024:  # kinds are templates, so few; this only bounds an odd logger
            self._seen.clear()
        self._seen[kind] = (now, 0)
        return True


def _protocol(max_connections: int, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head and a bound on open connections."""
    waiting: dict[H11Protocol, None] = {}  # connections waiting for a request head, longest first

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_head()
            if len(self.connections) > max_connections:
                next(iter(waiting))._close_waiting()  # this one when no other waits

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle.response_complete:
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._stop_waiting()
            waiting[self] = None
            self._head_timer = self.loop.call_later(header_timeout_s, self._close_waiting)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _close_waiting(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol


class HttpServer:
    def __init__(self, generator: Generator, config: GatewayConfig) -> None:
        self.app = create_app(generator, config)
        self._address = config.http_address
        self._server = embedded_http.EmbeddedServer(
            uvicorn.Config(
                self.app, log_config=None, access_log=False, lifespan="off",
                timeout_graceful_shutdown=config.drain_timeout_s + CUT_GRACE_S,
                http=_protocol(config.max_http_connections, config.http_header_timeout_s),
                limit_concurrency=config.max_http_connections + 1, timeout_keep_alive=config.http_keep_alive_s,
                h11_max_incomplete_event_size=config.http_max_header_bytes,
            )
        )
        for name in ("uvicorn.error", "uvicorn.asgi"):
            uvicorn_logger = logging.getLogger(name)
            if not any(isinstance(f, RepeatFilter) for f in uvicorn_logger.filters):
                uvicorn_logger.addFilter(RepeatFilter())
        self._drain_timeout_s = config.drain_timeout_s
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (an address with port 0 gets a free one)."""
        if self._socket is None:
            raise RuntimeError("the HTTP server is not started")
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Returns once the socket listens; raises OSError when it cannot bind."""
        self._socket = embedded_http.listen(self._address)
        self._task = await embedded_http.start(self._server, self._socket, "http")

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish for up to drain_timeout_s, then cuts their generations
        (a stream ends with an error event and [DONE], a cut generation aborts its request in the scheduler);
        what still runs CUT_GRACE_S later is cancelled."""
        if self._task is None:
            return
        self._server.should_exit = True
        cut = asyncio.create_task(self.app.state.drain.cut_after(self._drain_timeout_s), name="http drain")
        await self._task
        cut.cancel()
        cancelled = list(self._server.server_state.tasks)
        if cancelled:
            await asyncio.wait(cancelled)
        self._task = None
