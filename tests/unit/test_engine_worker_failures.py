"""The engine loop when the gpu_worker fails it: a lost CPU pool costs no request a token (the loop retries at once,
serves on the accelerator, and places on the CPU again once a newer pool is attached, with a new cost model where its
profile differs), and shows in the metrics and the failed iteration's span; a lost gpu_worker fails every request
with UNAVAILABLE at once, takes the service out of SERVING until the worker is back and Reset, and stops the service
if the worker comes back as another one."""

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

import pytest
from fake_hybrid_worker import AsyncHybridWorker, token_for
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from test_engine_loop import _drain
from test_scheduler_cpu_loss import cpu_admission, make, once
from test_scheduler_pools import COSTS, MODEL

from apex_serve import errors
from apex_serve.types import ExecutionMode, FinishReason, Placement, SamplingParams, WorkerInfo
from conftest import prometheus_value, wait_until_async
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ComposedCostModel, ConstantCostModel
from scheduler_service.cpu_pool_watch import CpuPoolWatch
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.telemetry.observer import EngineObserver
from scheduler_service.telemetry.spans import IterationSpans
from scheduler_service.worker_port import WorkerReplaced

PROMPT = 10


@dataclass
class Service:
    """Records what the loop tells the gRPC service."""

    serving: list[bool] = field(default_factory=list)
    stop_requested: bool = False

    async def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)

    def request_stop(self) -> None:
        self.stop_requested = True


@dataclass
class Loader:
    """Stands in for cost.loader.load_cost_model: a new model per call, and the infos it was called with."""

    calls: list[WorkerInfo] = field(default_factory=list)

    async def __call__(self, config: SchedulerConfig, info: WorkerInfo) -> ComposedCostModel:
        self.calls.append(info)
        return ConstantCostModel(COSTS, MODEL)


def engine(scheduler: Scheduler, worker: AsyncHybridWorker, service: Service | None = None,
           loader: Loader | None = None, spans: IterationSpans | None = None) -> EngineLoop:
    watch = CpuPoolWatch(scheduler, worker, loader or Loader(), interval_s=0.01)
    observer = EngineObserver(EngineMetrics(scheduler), spans)
    loop = EngineLoop(scheduler, worker, observer, service, watch)
    loop.start()
    return loop


def submit(loop: EngineLoop, request_id: str, max_tokens: int) -> asyncio.Queue:
    return loop.submit(request_id, [5] * PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                ignore_eos=True))


def tokens(items: list) -> list[int]:
    return [t for item in items for t in item.new_token_ids]


def metric(loop: EngineLoop, series: str) -> float:
    return prometheus_value(generate_latest(loop.observer.metrics.registry).decode(), series)


async def test_a_lost_cpu_pool_costs_no_request_a_token_and_cpu_placement_resumes_once_a_new_pool_is_attached(
        caplog: pytest.LogCaptureFixture) -> None:
    s = make()
    w = AsyncHybridWorker(s.worker_info, once(lambda plan: plan.step_id >= 3))  # CPU rows decoding, mid-stream
    loop = engine(s, w)
    caplog.set_level(logging.WARNING, logger="scheduler_service.engine_loop")
    queues = {f"r{i}": submit(loop, f"r{i}", 20) for i in range(8)}
    streams = dict(zip(queues, await asyncio.gather(*(_drain(q) for q in queues.values())), strict=True))
    assert len(w.losses) == 1 and w.losses[0].requeued
    for request_id, items in streams.items():
        assert tokens(items) == [token_for(request_id, PROMPT + k) for k in range(20)], request_id
        assert items[-1].finish_reason is FinishReason.LENGTH
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lost its CPU pool" in warnings[0].getMessage()
    assert s.stats().cpu_pool_degraded
    assert metric(loop, "apex_cpu_pool_degraded") == 1.0 and metric(loop, "apex_cpu_pool_losses_total") == 1.0

    w.reattach()
    await wait_until_async(lambda: not s.cpu_pool_degraded, 5, "the CPU pool restored")
    assert metric(loop, "apex_cpu_pool_degraded") == 0.0 and metric(loop, "apex_cpu_pool_losses_total") == 1.0
    restored_at = len(w.plans)
    later = [submit(loop, f"later{i}", 20) for i in range(8)]
    await asyncio.gather(*(_drain(q) for q in later))
    after = w.plans[restored_at:]
    assert any(n.placement is Placement.CPU for p in after for n in p.new_requests), "nothing placed on the CPU"
    assert any(p.mode is not ExecutionMode.GPU_ONLY for p in after), "no hybrid iteration after the restore"
    await loop.stop()
    stats = s.stats()
    assert stats.free_blocks == stats.total_blocks and not w.held


@pytest.mark.parametrize(("changes", "reloads"), [({"num_cpu_kv_blocks": 300}, False), ({"cpu_max_rows": 2}, True),
                                                  ({"cpu_kv_dtype": "bfloat16"}, True)])
async def test_a_restored_pool_of_another_profile_gets_a_new_cost_model_and_one_of_the_same_keeps_it(
        changes: dict[str, object], reloads: bool) -> None:
    s = make()
    before = s.cost_model
    w = AsyncHybridWorker(s.worker_info, once(cpu_admission))
    loader = Loader()
    loop = engine(s, w, loader=loader)
    await asyncio.gather(*(_drain(submit(loop, f"r{i}", 10)) for i in range(8)))
    assert s.cpu_pool_degraded
    w.reattach(**changes)
    await wait_until_async(lambda: not s.cpu_pool_degraded, 5, "the CPU pool restored")
    await loop.stop()
    assert [info.cpu_pool_generation for info in loader.calls] == ([2] if reloads else [])
    assert (s.cost_model is not before) == reloads
    assert s.policy.cost_model is s.cost_model
    assert s.worker_info == w.info_now


async def test_the_failed_iteration_span_records_the_lost_cpu_pool_and_the_retry_has_its_own() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make(async_scheduling=False)
    w = AsyncHybridWorker(s.worker_info, once(cpu_admission))
    loop = engine(s, w, spans=IterationSpans(provider.get_tracer("test")))
    await asyncio.gather(*(_drain(submit(loop, f"r{i}", 5)) for i in range(8)))
    await loop.stop()
    spans = {span.attributes["apex.iteration.step_id"]: span for span in exporter.get_finished_spans()
             if span.name == "apex.iteration"}
    lost_step = w.losses[0].plan.step_id
    failed, retry = spans[lost_step], spans[lost_step + 1]
    assert not failed.status.is_ok and [e.attributes["exception.type"] for e in failed.events] == [
        "apex_serve.errors.CpuPoolLost"]
    assert retry.status.is_ok and retry.attributes["apex.iteration.mode"] == ExecutionMode.GPU_ONLY.value


async def test_with_async_scheduling_the_step_planned_ahead_of_a_lost_cpu_pool_is_refused_and_its_requests_requeued(
        ) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = make()
    w = AsyncHybridWorker(s.worker_info, once(cpu_admission))
    loop = engine(s, w, spans=IterationSpans(provider.get_tracer("test")))
    outs = await asyncio.gather(*(_drain(submit(loop, f"r{i}", 5)) for i in range(8)))
    await loop.stop()
    spans = {span.attributes["apex.iteration.step_id"]: span for span in exporter.get_finished_spans()
             if span.name == "apex.iteration"}
    lost_step = w.losses[0].plan.step_id
    refused = spans[lost_step + 1]
    assert refused.attributes.get("apex.iteration.step_id") == lost_step + 1
    assert [e.attributes["exception.type"] for e in refused.events] == ["apex_serve.errors.StepRefused"]
    # nobody failed, every request got its 5 tokens, the accelerator's pool is whole again
    for i, out in enumerate(outs):
        assert [t for o in out for t in o.new_token_ids] == [token_for(f"r{i}", PROMPT + n) for n in range(5)]
        assert out[-1].finish_reason is FinishReason.LENGTH
    assert s.stats().free_blocks[Placement.GPU] == s.stats().total_blocks[Placement.GPU]


async def test_a_lost_gpu_worker_fails_every_request_at_once_and_serving_resumes_after_a_reset(
        caplog: pytest.LogCaptureFixture) -> None:
    s = make(max_num_seqs=2)
    w = AsyncHybridWorker(s.worker_info)
    service = Service()
    loop = engine(s, w, service)
    queues = [submit(loop, f"r{i}", 10_000 // PROMPT) for i in range(4)]  # two run, two wait
    await queues[0].get()
    lost_at = time.monotonic()
    w.gone = True
    outcomes = [(await _drain(q))[-1] for q in queues]
    assert time.monotonic() - lost_at < 1.0
    assert all(isinstance(o, errors.Unavailable) and "lost the gpu_worker" in str(o) for o in outcomes)
    assert service.serving == [False]
    with pytest.raises(errors.Unavailable):
        submit(loop, "while-away", 3)
    assert any(r.levelno == logging.ERROR and "lost the gpu_worker" in r.getMessage() for r in caplog.records)

    w.gone = False
    await wait_until_async(lambda: service.serving == [False, True], 10, "SERVING again")
    assert w.resets == 1 and not w.held
    served = await _drain(submit(loop, "after", 3))
    assert tokens(served) == [token_for("after", PROMPT + k) for k in range(3)]
    await loop.stop()
    stats = s.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.free_blocks == stats.total_blocks
    assert not service.stop_requested


async def test_a_gpu_worker_that_comes_back_with_another_pool_stops_the_service_to_start_anew(
        caplog: pytest.LogCaptureFixture) -> None:
    s = make()
    w = AsyncHybridWorker(s.worker_info)
    service = Service()
    loop = engine(s, w, service)
    queue = submit(loop, "r0", 1000)
    await queue.get()
    w.gone = True
    assert isinstance((await _drain(queue))[-1], errors.Unavailable)
    w.info_now = replace(w.info_now, num_kv_blocks=99)
    w.gone = False
    await wait_until_async(lambda: service.stop_requested, 10, "the service asked to stop")
    assert isinstance(loop.failure, WorkerReplaced) and "num_kv_blocks 12 -> 99" in str(loop.failure)
    assert w.resets == 0
    assert any(r.levelno == logging.ERROR and "num_kv_blocks" in r.getMessage() for r in caplog.records)
    with pytest.raises(errors.Unavailable):
        submit(loop, "r1", 3)
    await loop.stop()


async def test_a_gpu_worker_lost_while_the_loop_idles_degraded_is_noticed_without_a_request() -> None:
    s = make()
    w = AsyncHybridWorker(s.worker_info, once(cpu_admission))
    service = Service()
    loop = engine(s, w, service)
    await asyncio.gather(*(_drain(submit(loop, f"r{i}", 5)) for i in range(8)))
    assert s.cpu_pool_degraded
    w.gone = True
    await wait_until_async(lambda: service.serving == [False], 5, "NOT_SERVING")
    w.reattach()
    w.gone = False
    await wait_until_async(lambda: service.serving == [False, True], 10, "SERVING again")
    await wait_until_async(lambda: not s.cpu_pool_degraded, 5, "the CPU pool restored")
    await loop.stop()
