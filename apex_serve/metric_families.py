"""Prometheus metric families to and from protobuf: the scheduler's GetMetrics answer, relayed by the gateway. Apart
from apex_serve.convert so that the client SDK, which uses convert, does not load prometheus_client."""

from collections.abc import Iterable

from prometheus_client.metrics_core import Metric

from apex_serve.v1 import scheduler_pb2


def to_pb(families: Iterable[Metric]) -> scheduler_pb2.GetMetricsResponse:
    """A registry's collected families (their samples' timestamps and exemplars are not carried)."""
    return scheduler_pb2.GetMetricsResponse(families=[
        scheduler_pb2.MetricFamily(
            name=f.name, type=f.type, help=f.documentation, unit=f.unit,
            samples=[scheduler_pb2.MetricSample(name=s.name, labels=s.labels, value=s.value) for s in f.samples],
        )
        for f in families
    ])


def from_pb(msg: scheduler_pb2.GetMetricsResponse) -> list[Metric]:
    families = []
    for f in msg.families:
        family = Metric(f.name, f.help, f.type, f.unit)
        for s in f.samples:
            family.add_sample(s.name, dict(s.labels), s.value)
        families.append(family)
    return families
