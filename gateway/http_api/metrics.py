"""Prometheus metrics of the HTTP front end, in a registry per app, and the /metrics exposition: these, then the
engine families of every scheduler replica (scheduler_service/telemetry/metrics.py, docs/observability.md), each
series labelled with its replica's address."""

import logging
from collections.abc import Iterator, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.generation import GenerationEnd, Generator
from gateway.replicas import ReplicaMetrics

logger = logging.getLogger(__name__)

UNMATCHED = "unmatched"  # one label for every unknown path, so scanners cannot grow the series
REPLICA_LABEL = "replica"
REPLICA_METRICS_TIMEOUT_S = 1.0  # a replica slower than this is left out of the scrape, which still answers


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def with_replica_label(answers: Sequence[ReplicaMetrics]) -> list[Metric]:
    """The families of the replicas that answered, one per name, each sample labelled with its replica's address."""
    merged: dict[str, Metric] = {}
    for answer in answers:
        for family in answer.families or ():
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                target.add_sample(s.name, {REPLICA_LABEL: answer.address, **s.labels}, s.value, s.timestamp)
    return list(merged.values())


class HttpMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, generator: Generator) -> None:
        self._replicas = generator.replicas
        self._failing: set[str] = set()  # replicas whose metrics the latest scrape could not fetch
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
        self.replica_errors = Counter(
            "apex_replica_metrics_errors", "Scrapes of /metrics that could not fetch a replica's engine metrics",
            [REPLICA_LABEL], registry=self.registry,
        )
        for replica in self._replicas.replicas:
            self.replica_errors.labels(replica.address)

    def finished(self, end: GenerationEnd) -> None:
        self.prompt_tokens.inc(end.prompt_tokens)
        self.generation_tokens.inc(end.completion_tokens)

    async def exposition(self) -> bytes:
        """The gateway's families, then every replica's engine families (fetched concurrently; a replica that does
        not answer in time is left out and counted)."""
        answers = await self._replicas.metric_families(REPLICA_METRICS_TIMEOUT_S)
        for answer in answers:
            self._note(answer)
        return generate_latest(self.registry) + generate_latest(_Families(with_replica_label(answers)))

    def _note(self, answer: ReplicaMetrics) -> None:
        if answer.families is None:
            self.replica_errors.labels(answer.address).inc()
            if answer.address not in self._failing:
                self._failing.add(answer.address)
                logger.warning("/metrics: no engine metrics from replica %s (%s)", answer.address, answer.error)
        elif answer.address in self._failing:
            self._failing.discard(answer.address)
            logger.info("/metrics: engine metrics from replica %s again", answer.address)


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
