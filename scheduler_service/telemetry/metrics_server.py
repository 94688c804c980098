"""The engine's metrics on a port of their own: prometheus-client's ASGI app under uvicorn, as a task of the
scheduler's event loop. An open connection costs a socket, not a thread (prometheus-client's start_http_server
keeps a thread per connection), and a scrape reads the scheduler on the loop that changes it."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app

logger = logging.getLogger(__name__)

# Idle keep-alive connections close after this; no cap on connections: uvicorn's limit_concurrency counts idle
# ones too and would answer scrapes 503 while a few sockets sit open.
KEEP_ALIVE_S = 5
STOP_S = 1.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the scheduler process handles SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsServer:
    """/metrics (any path answers) on host:port; no host: every interface; port 0: a free one."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self._socket = socket.create_server(
            (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128
        )
        self._server = _EmbeddedServer(
            uvicorn.Config(
                make_asgi_app(registry), log_config=None, access_log=False, lifespan="off",
                timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=STOP_S,
            )
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        """Returns once the port answers."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="metrics-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the metrics server exited during start-up")
            await asyncio.sleep(0.01)
        host, port = self._socket.getsockname()[:2]
        logger.info("Prometheus metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
