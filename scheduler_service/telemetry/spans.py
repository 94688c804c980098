"""OpenTelemetry spans of engine iterations (DESIGN §8): one `apex.iteration` span per step, linked to the spans of
the requests it served, current from before the Step call until after the scheduler's update (so the gpu_worker's
SERVER span is its child, and the iteration record carries the measured overlap by its end); on sampled steps one
child span per layer and subtask, with the times both workers recorded. Names: apex_serve.span_attributes."""

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from apex_serve import overlap
from apex_serve import span_attributes as attr
from apex_serve.engine_stats import IterationRecord
from apex_serve.types import StepOutput, StepPlan, Subtask


def _record_attributes(plan: StepPlan, record: IterationRecord | None) -> dict[str, int | str | bool]:
    attributes: dict[str, int | str | bool] = {
        attr.ITERATION_STEP_ID: plan.step_id, attr.ITERATION_MODE: plan.mode.value,
        attr.ITERATION_SAMPLED: plan.record_subtasks,
    }
    if record is not None:
        attributes |= {
            attr.ITERATION_NUM_PREFILLS: record.num_prefills, attr.ITERATION_PREFILL_TOKENS: record.prefill_tokens,
            attr.ITERATION_GPU_ROWS: record.gpu_rows,
            attr.ITERATION_CPU_ROWS: record.cpu_rows, attr.ITERATION_CPU_SAT_OUT: record.cpu_sat_out,
        }
    return attributes


def _overlap_attributes(o: overlap.Overlap) -> dict[str, int | float]:
    return {
        attr.OVERLAP_HIDDEN_RATIO: o.hidden_ratio, attr.OVERLAP_CPU_ATTENTION_NS: o.cpu_attention_ns,
        attr.OVERLAP_HIDDEN_NS: o.hidden_ns, attr.OVERLAP_DEVICE_IDLE_NS: o.device_idle_ns,
        attr.OVERLAP_CPU_IDLE_NS: o.cpu_idle_ns,
    }


@dataclass(frozen=True)
class IterationSpan:
    """An open iteration span. Two may be open at once (a step and the one planned ahead of it), so none is made
    current for longer than the call that sends its plan (current())."""

    span: trace.Span

    def current(self) -> AbstractContextManager[trace.Span]:
        """The span as the current one while its plan is sent: the Step call's client span is its child."""
        return trace.use_span(self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False)


class IterationSpans:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def start(self, plan: StepPlan, record: IterationRecord | None, requests: Iterable[SpanContext]) -> IterationSpan:
        """Opens the plan's span; end() or fail() closes it."""
        links = [Link(context) for context in requests if context.is_valid]
        span = self._tracer.start_span(
            attr.ITERATION_SPAN, kind=SpanKind.INTERNAL, links=links, attributes=_record_attributes(plan, record),
            start_time=time.time_ns(),
        )
        return IterationSpan(span)

    def end(self, iteration: IterationSpan, output: StepOutput, record: IterationRecord | None) -> None:
        """Closes the span with the step's measured time and overlap, and its per-layer children when sampled."""
        span = iteration.span
        if record is not None and record.overlap is not None:
            span.set_attributes(_overlap_attributes(record.overlap))
        span.set_attribute(attr.ITERATION_MEASURED_NS, output.timings.total_ns)
        self._subtask_spans(span, output.subtasks)
        span.end()

    def fail(self, iteration: IterationSpan, error: Exception | None) -> None:
        """Closes the span of a step that raised `error` (recorded, status ERROR) or was cancelled (None)."""
        span = iteration.span
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    def _subtask_spans(self, parent: trace.Span, subtasks: Iterable[Subtask]) -> None:
        context = trace.set_span_in_context(parent)
        for s in subtasks:
            child = self._tracer.start_span(
                attr.SUBTASK_SPANS[s.kind], context=context, start_time=s.start_unix_ns, attributes={
                    attr.SUBTASK_KIND: s.kind.value,
                    attr.SUBTASK_LANE: attr.LANE_CPU if s.kind.on_cpu else attr.LANE_ACCELERATOR,
                    attr.SUBTASK_LAYER: s.layer, attr.SUBTASK_SUB_BATCH: s.sub_batch,
                },
            )
            child.end(end_time=s.end_unix_ns)
