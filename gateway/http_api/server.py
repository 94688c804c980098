"""Runs the HTTP app with uvicorn inside the gateway's event loop; the gateway owns signals."""

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn

from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.app import create_app

logger = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway process drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    def __init__(self, generator: Generator, config: GatewayConfig) -> None:
        host, _, port = config.http_address.rpartition(":")
        self._server = _EmbeddedServer(
            uvicorn.Config(
                create_app(generator, config), host=host, port=int(port), log_level="warning", lifespan="off",
                timeout_graceful_shutdown=int(config.drain_timeout_s),
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns once the socket listens; raises if uvicorn could not start (port taken...)."""
        self._task = asyncio.create_task(self._server.serve(), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server exited during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to drain_timeout_s), then close."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
