"""The Host check that keeps DNS rebinding off the API: a page on another site whose name an attacker points at
127.0.0.1 reaches a loopback gateway from the victim's browser, with its own name in the Host header. Requests
whose Host is not allowed get 400 in OpenAI's error shape before any route runs; /health and /ping stay open to
every Host, as Kubernetes probes send the pod's IP (and they tell nothing but up or down).

Starlette's TrustedHostMiddleware is not used: it answers in plain text, cuts an IPv6 Host such as `[::1]:8000`
at its first colon, and has no open paths."""

import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.http_api.errors import error_response

ANY_HOST = "*"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/health", "/ping"})


def host_name(host: str) -> str:
    """The name in a Host value or a bind address, without port, IPv6 brackets or letter case:
    `[::1]:8000` -> `::1`, `Localhost:80` -> `localhost`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(configured: frozenset[str], http_address: str) -> frozenset[str] | None:
    """The Host names to accept, None for any: the configured ones (`*`: any), else on a loopback bind address
    the loopback names and that address, else any."""
    if configured:
        return None if ANY_HOST in configured else configured
    bound = host_name(http_address.rpartition(":")[0])
    return LOOPBACK_NAMES | {bound} if _is_loopback(bound) else None


class HostCheck:
    """ASGI middleware: 400 for an HTTP request whose Host header is missing or not in `allowed`."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        if host is not None and host_name(host) in self.allowed:
            await self.app(scope, receive, send)
            return
        message = "missing Host header" if host is None else f"Host {host!r} is not served here (see --allowed-hosts)"
        await error_response(400, message, param="Host")(scope, receive, send)
