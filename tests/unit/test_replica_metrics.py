"""The engine's metric families through GetMetrics' message and back, merged across replicas with a `replica`
label: what prometheus_client writes and parses is the same as the engine's own exposition, plus the label."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apex_serve import metric_families
from apex_serve.types import WorkerInfo
from gateway.http_api.metrics import _Families, with_replica_label
from gateway.replicas import ReplicaMetrics
from scheduler_service.config import SchedulerConfig
from scheduler_service.scheduler import Scheduler
from scheduler_service.telemetry.metrics import EngineMetrics

INFO = WorkerInfo("m", 4, 259, 2048, (1,), 16, 64, "cpu", "float32")


def _series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_families_survive_the_message_and_are_merged_under_a_replica_label() -> None:
    engines = [EngineMetrics(Scheduler(SchedulerConfig(), INFO)) for _ in range(2)]
    engines[0].ttft.observe(0.03)
    engines[1].ttft.observe(0.3)
    engines[1].generation_tokens.inc(5)
    answers = [
        ReplicaMetrics(f"unix:///r{i}.sock", metric_families.from_pb(metric_families.to_pb(e.registry.collect())))
        for i, e in enumerate(engines)
    ]
    answers.insert(1, ReplicaMetrics("unix:///down.sock", None, "UNAVAILABLE: gone"))
    merged = generate_latest(_Families(with_replica_label(answers))).decode()

    names = [f.name for f in text_string_to_metric_families(merged)]
    assert len(names) == len(set(names)), "a family must appear once, with every replica's samples"
    got = _series(merged)
    for i, engine in enumerate(engines):
        own = _series(generate_latest(engine.registry).decode())
        assert {(name, tuple(sorted((*labels, ("replica", f"unix:///r{i}.sock"))))): v
                for (name, labels), v in own.items()}.items() <= got.items()
    assert not any(("replica", "unix:///down.sock") in labels for _, labels in got)
    assert got[("apex_time_to_first_token_seconds_bucket", (("le", "0.04"), ("replica", "unix:///r0.sock")))] == 1
    assert got[("apex_time_to_first_token_seconds_bucket", (("le", "0.04"), ("replica", "unix:///r1.sock")))] == 0
    assert got[("apex_generation_tokens_total", (("replica", "unix:///r1.sock"),))] == 5
