"""What the engine loop reports: Prometheus latency histograms and counters with the right counts, the overlap of
every iteration, the sampled iteration's timeline, and iteration spans linked to the request spans they served with
per-layer children on sampled iterations (real OTel SDK, in-memory exporter)."""

import asyncio
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from test_engine_loop import INFO, Port, _drain

from apex_serve.types import (
    ExecutionMode,
    SamplingParams,
    StepOutput,
    StepPlan,
    StepTimings,
    Subtask,
    SubtaskKind,
)
from conftest import prometheus_value
from scheduler_service.config import SchedulerConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.telemetry.observer import EngineObserver
from scheduler_service.telemetry.spans import IterationSpans

MS = 1_000_000
MAX_TOKENS = 5


class TimedWorker:
    """Token 7 for every row; each step 2 ms, with 4 ms of CPU attention of which the accelerator waited 1 ms, and
    per-layer intervals when the plan asks for them."""

    def __init__(self) -> None:
        self.sampled_steps: list[int] = []

    async def step(self, plan: StepPlan) -> StepOutput:
        await asyncio.sleep(0.002)
        ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
        start = time.time_ns()
        timings = StepTimings(forward_ns=5 * MS, total_ns=6 * MS, wait_ns=1 * MS, cpu_attention_ns=4 * MS,
                              start_unix_ns=start)
        subtasks: tuple[Subtask, ...] = ()
        if plan.record_subtasks:
            self.sampled_steps.append(plan.step_id)
            subtasks = (
                Subtask(SubtaskKind.DEVICE_LINEAR, 0, 0, start, start + 3 * MS),
                Subtask(SubtaskKind.CPU_ATTENTION, 0, 0, start + 1 * MS, start + 5 * MS),
            )
        return StepOutput(plan.step_id, {rid: 7 for rid in ids}, timings, subtasks=subtasks)


async def _run(observer: EngineObserver, worker: TimedWorker, scheduler: Scheduler, contexts: list) -> list:
    loop = EngineLoop(scheduler, Port(worker.step), observer)
    loop.start()
    queues = [
        loop.submit(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), context)
        for i, context in enumerate(contexts)
    ]
    streams = await asyncio.gather(*(_drain(q) for q in queues))
    await loop.stop()
    return streams


async def test_latency_histograms_count_every_request_and_token_and_overlap_is_recorded_per_iteration() -> None:
    scheduler = Scheduler(SchedulerConfig(sample_layers_every=4), INFO)
    observer = EngineObserver(metrics=EngineMetrics(scheduler))
    worker = TimedWorker()
    await _run(observer, worker, scheduler, [None] * 3)
    text = generate_latest(observer.metrics.registry).decode()
    assert prometheus_value(text, "apex_time_to_first_token_seconds_count") == 3
    assert prometheus_value(text, "apex_inter_token_latency_seconds_count") == 3 * (MAX_TOKENS - 1)
    assert prometheus_value(text, "apex_e2e_request_latency_seconds_count") == 3
    assert prometheus_value(text, "apex_request_queue_time_seconds_count") == 3
    assert prometheus_value(text, "apex_prompt_tokens_total") == 9
    assert prometheus_value(text, "apex_generation_tokens_total") == 3 * MAX_TOKENS
    assert prometheus_value(text, 'apex_request_success_total{finished_reason="length"}') == 3
    iterations = prometheus_value(text, 'apex_iterations_total{mode="gpu_only"}')
    stats = scheduler.stats()
    assert iterations == stats.num_steps
    assert prometheus_value(text, "apex_iteration_overlap_ratio_count") == iterations
    assert abs(prometheus_value(text, "apex_cpu_attention_hidden_seconds_total") - iterations * 0.003) < 1e-9
    assert abs(prometheus_value(text, "apex_device_idle_seconds_total") - iterations * 0.001) < 1e-9
    assert prometheus_value(text, "apex_num_requests_running") == 0
    assert prometheus_value(text, 'apex_kv_cache_usage_perc{pool="accelerator"}') == 0.0
    overlaps = [r.overlap for r in stats.recent_iterations]
    assert all(o is not None and abs(o.hidden_ratio - 0.75) < 1e-12 for o in overlaps)
    assert worker.sampled_steps and all(step % 4 == 0 for step in worker.sampled_steps)
    serving = observer.stats()
    timeline = serving.latest_timeline
    assert timeline is not None and timeline.step_id == worker.sampled_steps[-1]
    assert timeline.overlap.cpu_attention_ns == 4 * MS and timeline.overlap.hidden_ns == 2 * MS
    assert serving.num_finished == 3 and serving.generation_tokens == 3 * MAX_TOKENS


async def test_an_aborted_request_counts_as_finished_with_reason_abort() -> None:
    scheduler = Scheduler(SchedulerConfig(sample_layers_every=0), INFO)
    observer = EngineObserver(metrics=EngineMetrics(scheduler))
    loop = EngineLoop(scheduler, Port(TimedWorker().step), observer)
    loop.start()
    queue = loop.submit("long", [1, 2], SamplingParams(max_tokens=100, ignore_eos=True))
    await queue.get()
    loop.abort("long")
    await loop.stop()
    text = generate_latest(observer.metrics.registry).decode()
    assert prometheus_value(text, 'apex_request_success_total{finished_reason="abort"}') == 1
    assert observer.stats().num_finished == 1


async def test_iteration_spans_link_the_request_spans_and_sampled_ones_have_per_layer_children() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    requests = [tracer.start_span(f"request {i}") for i in range(2)]
    scheduler = Scheduler(SchedulerConfig(sample_layers_every=2), INFO)
    observer = EngineObserver(spans=IterationSpans(tracer))
    worker = TimedWorker()
    await _run(observer, worker, scheduler, [r.get_span_context() for r in requests])
    for r in requests:
        r.end()
    spans = exporter.get_finished_spans()
    iterations = [s for s in spans if s.name == "apex.iteration"]
    assert len(iterations) == scheduler.stats().num_steps
    request_ids = {r.get_span_context().span_id for r in requests}
    for it in iterations:
        assert {link.context.span_id for link in it.links} == request_ids  # both requests ran in every iteration
        assert it.attributes["apex.iteration.mode"] == ExecutionMode.GPU_ONLY.value
        assert it.attributes["apex.overlap.hidden_ratio"] == 0.75
        assert it.attributes["apex.iteration.gpu_rows"] + it.attributes["apex.iteration.num_prefills"] == 2
    children = [s for s in spans if s.parent is not None and s.name in ("device_linear", "cpu_attention")]
    sampled = {it.context.span_id: it for it in iterations if it.attributes["apex.iteration.sampled"]}
    assert len(sampled) == len(worker.sampled_steps) and len(children) == 2 * len(sampled)
    for child in children:
        assert child.parent.span_id in sampled
        assert child.attributes["apex.subtask.lane"] == ("cpu" if child.name == "cpu_attention" else "accelerator")
        assert child.end_time - child.start_time == (4 * MS if child.name == "cpu_attention" else 3 * MS)


async def test_a_failed_step_ends_its_span_with_the_error_and_later_spans_are_not_its_children() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = TimedWorker()

    async def step(plan: StepPlan) -> StepOutput:
        if plan.step_id == 0:
            raise ConnectionError("worker went away")
        return await worker.step(plan)

    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO), Port(step), EngineObserver(spans=IterationSpans(
        provider.get_tracer("test"))))
    loop.start()
    assert isinstance((await _drain(loop.submit("first", [1, 2], SamplingParams(max_tokens=3))))[-1], ConnectionError)
    await _drain(loop.submit("second", [1, 2], SamplingParams(max_tokens=3)))
    await loop.stop()
    failed, refused, *served = [s for s in exporter.get_finished_spans() if s.name == "apex.iteration"]
    assert failed.attributes["apex.iteration.step_id"] == 0 and not failed.status.is_ok
    assert [e.name for e in failed.events] == ["exception"]
    # step 1 was planned ahead of step 0's output (asynchronous scheduling): the worker refused it
    assert refused.attributes["apex.iteration.step_id"] == 1 and not refused.status.is_ok
    assert len(served) == 3 and all(s.parent is None and s.status.is_ok for s in served)
