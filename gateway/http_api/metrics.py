"""Prometheus metrics of the HTTP front end, in a registry per app; the engine's are the scheduler's
(scheduler_service/telemetry/metrics.py, docs/observability.md)."""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.generation import GenerationEnd, Generator

UNMATCHED = "unmatched"  # one label for every unknown path, so scanners cannot grow the series


class HttpMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, generator: Generator) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "apex_http_requests", "HTTP requests by endpoint (route template) and status code",
            ["endpoint", "status"], registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "apex_http_prompt_tokens", "Prompt tokens of finished HTTP generations", registry=self.registry
        )
        self.generation_tokens = Counter(
            "apex_http_generation_tokens", "Tokens generated for finished HTTP generations", registry=self.registry
        )
        in_flight = Gauge(
            "apex_requests_in_flight", "Generations in flight in the gateway (gRPC and HTTP)", registry=self.registry
        )
        in_flight.set_function(lambda: generator.num_active)

    def finished(self, end: GenerationEnd) -> None:
        self.prompt_tokens.inc(end.prompt_tokens)
        self.generation_tokens.inc(end.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """Pure ASGI middleware counting responses by endpoint and status. (Starlette's BaseHTTPMiddleware
    would wrap `receive` and hide client disconnects from the endpoints.)"""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500  # what the client gets when the app raises before responding

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_and_note)
        finally:
            route: BaseRoute | None = scope.get("route")
            self._metrics.requests.labels(getattr(route, "path", UNMATCHED), str(status)).inc()
