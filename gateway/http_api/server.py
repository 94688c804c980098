"""Runs the HTTP app with uvicorn as a task of the gateway's event loop; the gateway owns the signals."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.app import create_app

logger = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway process drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(address: str) -> socket.socket:
    """A listening socket for host:port ([v6]:port too); raises OSError when the port is taken."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=2048)


class HttpServer:
    def __init__(self, generator: Generator, config: GatewayConfig) -> None:
        self.app = create_app(generator, config)
        self._address = config.http_address
        self._server = _EmbeddedServer(
            uvicorn.Config(
                self.app, log_config=None, access_log=False, lifespan="off",
                timeout_graceful_shutdown=config.drain_timeout_s,
            )
        )
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
        self._socket = _listen(self._address)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server exited during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops accepting, lets requests in flight finish for up to drain_timeout_s, then cancels them
        (a cancelled generation aborts its request in the scheduler)."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        cancelled = list(self._server.server_state.tasks)
        if cancelled:
            await asyncio.wait(cancelled)
        self._task = None
