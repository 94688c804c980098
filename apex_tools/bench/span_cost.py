"""The scheduler-side CPU cost of tracing one engine iteration, measured without a stack: the iteration span with a
link per request, its per-layer children every 16th iteration, and the SDK's batch processor encoding them to OTLP
protobuf (what the exporter sends; only the network send is left out), against the same loop without spans.

CPU time of this process (time.process_time), so the export thread counts and other tenants of the machine do not."""

import asyncio
import random
import time
from dataclasses import replace

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from apex_serve import overlap
from apex_serve.engine_stats import IterationRecord
from apex_serve.types import CachedRequestData, ExecutionMode, StepOutput, StepPlan, StepTimings, Subtask, SubtaskKind
from scheduler_service.telemetry.spans import IterationSpans


class _EncodingExporter(SpanExporter):
    """Encodes each batch as the OTLP exporter does, and drops it."""

    def __init__(self) -> None:
        self.bytes = 0

    def export(self, spans) -> SpanExportResult:  # type: ignore[no-untyped-def]
        self.bytes += encode_spans(spans).ByteSize()
        return SpanExportResult.SUCCESS


def _output(step_id: int, layers: int, sampled: bool) -> StepOutput:
    start = time.time_ns()
    subtasks = tuple(
        Subtask(kind, layer, 0, start + layer * 1000, start + layer * 1000 + 500)
        for layer in range(layers) for kind in SubtaskKind
    ) if sampled else ()
    timings = StepTimings(forward_ns=10**8, total_ns=10**8, wait_ns=10**6, cpu_attention_ns=5 * 10**6,
                          start_unix_ns=start)
    return StepOutput(step_id, timings=timings, subtasks=subtasks)


async def _loop(spans: IterationSpans | None, iterations: int, rows: int, layers: int, every: int) -> None:
    rng = random.Random(0)
    contexts = [SpanContext(rng.getrandbits(128), rng.getrandbits(64), True, TraceFlags(1)) for _ in range(rows)]
    cached = tuple(CachedRequestData(f"r{i}", ()) for i in range(rows))
    for step_id in range(iterations):
        plan = StepPlan(step_id, cached_requests=cached, mode=ExecutionMode.ASYNC_OVERLAP,
                        record_subtasks=step_id % every == 0)
        output = _output(step_id, layers, plan.record_subtasks)
        record = IterationRecord(step_id, plan.mode, 0, 4, rows - 4, 0, 0, 0, 0)
        span = None if spans is None else spans.start(plan, record, contexts)
        await asyncio.sleep(0)  # the Step call
        measured = replace(record, overlap=overlap.from_timings(output.timings))  # as update_from_output does
        if spans is not None and span is not None:
            spans.end(span, output, measured)


def measure(iterations: int = 2000, rows: int = 32, layers: int = 8, every: int = 16) -> dict:
    """CPU µs per iteration with spans and without, and what the spans added."""
    started = time.process_time()
    asyncio.run(_loop(None, iterations, rows, layers, every))
    bare = time.process_time() - started
    exporter = _EncodingExporter()
    provider = TracerProvider()
    # room for every span: this loop makes them far faster than an engine does, and a dropped span costs nothing
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=iterations * (2 + 4 * layers)))
    started = time.process_time()
    asyncio.run(_loop(IterationSpans(provider.get_tracer("bench")), iterations, rows, layers, every))
    provider.force_flush()
    traced = time.process_time() - started
    provider.shutdown()
    return {
        "iterations": iterations, "rows_linked": rows, "layers": layers, "sample_every": every,
        "bare_us_per_iteration": 1e6 * bare / iterations, "traced_us_per_iteration": 1e6 * traced / iterations,
        "added_us_per_iteration": 1e6 * (traced - bare) / iterations,
        "otlp_bytes_per_iteration": exporter.bytes / iterations,
    }
