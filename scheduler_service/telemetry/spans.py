"""OpenTelemetry spans of engine iterations (DESIGN §8): one `apex.iteration` span per step, linked to the spans of
the requests it served, around the Step call and the scheduler's update (so the gpu_worker's SERVER span is its child,
and the iteration record carries the measured overlap by its end); on sampled steps one child span per layer and
subtask, with the times both workers recorded."""

import time
from collections.abc import Awaitable, Callable, Iterable

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind

from apex_serve import overlap
from apex_serve.types import RequestOutput, StepOutput, StepPlan, Subtask
from scheduler_service.iteration_record import IterationRecord

StepFn = Callable[[StepPlan], Awaitable[StepOutput]]
# one iteration: the worker's Step, then the scheduler's update from its output
IterateFn = Callable[[StepPlan], Awaitable[tuple[StepOutput, list[RequestOutput]]]]


def _record_attributes(plan: StepPlan, record: IterationRecord | None) -> dict[str, int | str | bool]:
    attributes: dict[str, int | str | bool] = {
        "apex.iteration.step_id": plan.step_id, "apex.iteration.mode": plan.mode.value,
        "apex.iteration.sampled": plan.record_subtasks,
    }
    if record is not None:
        attributes |= {
            "apex.iteration.num_prefills": record.num_prefills, "apex.iteration.gpu_rows": record.gpu_rows,
            "apex.iteration.cpu_rows": record.cpu_rows, "apex.iteration.cpu_sat_out": record.cpu_sat_out,
        }
    return attributes


def _overlap_attributes(o: overlap.Overlap) -> dict[str, int | float]:
    return {
        "apex.overlap.hidden_ratio": o.hidden_ratio, "apex.overlap.cpu_attention_ns": o.cpu_attention_ns,
        "apex.overlap.hidden_ns": o.hidden_ns, "apex.overlap.device_idle_ns": o.device_idle_ns,
        "apex.overlap.cpu_idle_ns": o.cpu_idle_ns,
    }


class IterationSpans:
    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def iterate(
        self, plan: StepPlan, record: IterationRecord | None, requests: Iterable[SpanContext], iterate: IterateFn
    ) -> tuple[StepOutput, list[RequestOutput]]:
        links = [Link(context) for context in requests if context.is_valid]
        span = self._tracer.start_span(
            "apex.iteration", kind=SpanKind.INTERNAL, links=links, attributes=_record_attributes(plan, record),
            start_time=time.time_ns(),
        )
        with trace.use_span(span, end_on_exit=True):
            output, outputs = await iterate(plan)
            if record is not None and record.overlap is not None:
                span.set_attributes(_overlap_attributes(record.overlap))
            span.set_attribute("apex.iteration.measured_ns", output.timings.total_ns)
            self._subtask_spans(span, output.subtasks)
        return output, outputs

    def _subtask_spans(self, parent: trace.Span, subtasks: Iterable[Subtask]) -> None:
        context = trace.set_span_in_context(parent)
        for s in subtasks:
            child = self._tracer.start_span(
                s.kind.value, context=context, start_time=s.start_unix_ns, attributes={
                    "apex.subtask.kind": s.kind.value, "apex.subtask.lane": "cpu" if s.kind.on_cpu else "accelerator",
                    "apex.subtask.layer": s.layer, "apex.subtask.sub_batch": s.sub_batch,
                },
            )
            child.end(end_time=s.end_unix_ns)
