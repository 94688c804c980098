"""The engine's metrics on a port of their own: prometheus-client's ASGI app under uvicorn, as a task of the
scheduler's event loop. An open connection costs a socket, not a thread (prometheus-client's start_http_server
keeps a thread per connection), and a scrape reads the scheduler on the loop that changes it."""

import asyncio
import logging

import uvicorn
from prometheus_client import CollectorRegistry, make_asgi_app

from apex_serve import embedded_http

logger = logging.getLogger(__name__)

# Idle keep-alive connections close after this; no cap on connections: uvicorn's limit_concurrency counts idle
# ones too and would answer scrapes 503 while a few sockets sit open.
KEEP_ALIVE_S = 5
STOP_S = 1.0


class MetricsServer:
    """/metrics (any path answers) on host:port; no host: every interface; port 0: a free one."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        self._socket = embedded_http.listen(address, backlog=128)
        self._server = embedded_http.EmbeddedServer(
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
        self._task = await embedded_http.start(self._server, self._socket, "metrics-http")
        host, port = self._socket.getsockname()[:2]
        logger.info("Prometheus metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
