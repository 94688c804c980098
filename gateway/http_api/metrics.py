"""Prometheus metrics of the HTTP front end (issue 8 adds the engine's), in a registry per app."""

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.generation import GenerationEnd, Generator


class HttpMetrics:
    def __init__(self, generator: Generator) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "apex_http_requests", "HTTP requests by path and status", ["path", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("apex_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("apex_generation_tokens", "Tokens generated", registry=self.registry)
        in_flight = Gauge("apex_gateway_requests_in_flight", "Requests streaming now", registry=self.registry)
        in_flight.set_function(lambda: generator.num_active)

    def finished(self, end: GenerationEnd) -> None:
        self.prompt_tokens.inc(end.prompt_tokens)
        self.generation_tokens.inc(end.completion_tokens)


class CountRequests:
    """Pure ASGI middleware counting responses by path and status. (Starlette's BaseHTTPMiddleware
    would wrap `receive` and hide client disconnects from the endpoints.)"""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_and_note)
        finally:
            self._metrics.requests.labels(scope["path"], str(status)).inc()
