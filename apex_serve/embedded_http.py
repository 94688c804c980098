"""An ASGI app served by uvicorn as a task of a service's own event loop; the service owns the signals (SIGTERM
drains it), so uvicorn installs no handlers of its own."""

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(address: str, backlog: int = 2048) -> socket.socket:
    """A listening socket for host:port ([v6]:port too; no host: every IPv4 interface; port 0: a free one); raises
    OSError when the port is taken."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=backlog)


async def start(server: EmbeddedServer, sock: socket.socket, name: str) -> "asyncio.Task[None]":
    """The server's task on sock, returned once it accepts; RuntimeError if it exits during start-up."""
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the {name} server exited during start-up")
        await asyncio.sleep(0.01)
    return task
