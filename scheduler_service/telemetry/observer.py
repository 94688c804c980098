"""What the engine loop reports about itself: per-request latencies (TTFT, inter-token, end-to-end, queue time),
per-iteration overlap and mode, tokens/s, the latest sampled iteration's timeline, Prometheus metrics and trace
spans. Pure bookkeeping beside the loop; metrics and tracing are optional."""

import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from apex_serve import overlap
from apex_serve.engine_stats import IterationRecord, IterationTimeline, ServingStats
from apex_serve.types import FinishReason, RequestOutput, StepOutput, StepPlan
from scheduler_service.in_flight import StepResult
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.telemetry.spans import IterationSpan, IterationSpans

TOKENS_WINDOW_S = 10.0  # tokens/s is measured over this much of the recent past


@dataclass
class _RequestTimes:
    arrival: float  # time.monotonic()
    trace_context: SpanContext
    scheduled: float | None = None
    last_token: float | None = None


class EngineObserver:
    """Called by the engine loop around each iteration: begin() before the Step call, then end() after the
    scheduler's update, or fail() when either raised."""

    def __init__(self, metrics: EngineMetrics | None = None, spans: IterationSpans | None = None) -> None:
        self.metrics = metrics
        self._spans = spans
        self._requests: dict[str, _RequestTimes] = {}
        self._tokens: deque[tuple[float, int]] = deque()  # (time, tokens produced by an iteration)
        self._latest_timeline: IterationTimeline | None = None
        self._num_finished = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

    def stats(self) -> ServingStats:
        return ServingStats(self.tokens_per_s(), self._num_finished, self._prompt_tokens, self._generation_tokens,
                            self._latest_timeline)

    def submitted(self, request_id: str, num_prompt_tokens: int, trace_context: SpanContext | None) -> None:
        self._requests[request_id] = _RequestTimes(time.monotonic(), trace_context or INVALID_SPAN_CONTEXT)
        self._prompt_tokens += num_prompt_tokens
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def aborted(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._finished(FinishReason.ABORT)

    def begin(self, plan: StepPlan, record: IterationRecord | None) -> IterationSpan | None:
        """Marks first-scheduled times; opens the iteration's span when tracing is on (None otherwise, and for a plan
        that only frees requests: no iteration)."""
        now = time.monotonic()
        for new in plan.new_requests:
            times = self._requests.get(new.request_id)
            if times is not None and times.scheduled is None:
                times.scheduled = now
                if self.metrics is not None:
                    self.metrics.queue.observe(now - times.arrival)
        if self._spans is None or plan.is_empty:
            return None
        contexts = [self._requests[r].trace_context for r in _request_ids(plan) if r in self._requests]
        return self._spans.start(plan, record, contexts)

    @staticmethod
    def current(span: IterationSpan | None) -> AbstractContextManager[object]:
        """The iteration's span as the current one while its plan is sent (nothing without tracing)."""
        return nullcontext() if span is None else span.current()

    def fail(self, span: IterationSpan | None, error: Exception | None) -> None:
        """The step or the update raised `error`, or the loop was cancelled during them (None)."""
        if span is not None and self._spans is not None:
            self._spans.fail(span, error)

    def end(self, span: IterationSpan | None, plan: StepPlan, output: StepOutput, result: StepResult) -> None:
        """After update_from_output: closes the span, then the iteration's metrics, its timeline when sampled, and
        each request's latencies."""
        record = result.record
        if span is not None and self._spans is not None:
            self._spans.end(span, output, record)
        if plan.is_empty:
            return
        if output.subtasks:
            t = output.timings
            self._latest_timeline = IterationTimeline(
                plan.step_id, plan.mode, t.start_unix_ns, t.start_unix_ns + t.total_ns, output.subtasks,
                overlap.from_subtasks(output.subtasks),
            )
        if self.metrics is not None and record is not None and record.overlap is not None:
            self.metrics.iteration(plan.mode, output.timings.total_ns / 1e9, record.overlap, record.preemptions)
        now = time.monotonic()
        produced = 0
        for out in result.outputs:
            produced += len(out.new_token_ids)
            self._token_times(out, now)
        self._generation_tokens += produced
        if self.metrics is not None and produced:
            self.metrics.generation_tokens.inc(produced)
        self._tokens.append((now, produced))
        self._trim(now)

    def _token_times(self, out: RequestOutput, now: float) -> None:
        times = self._requests.get(out.request_id)
        if times is None:
            return
        if out.new_token_ids and self.metrics is not None:
            if times.last_token is None:
                self.metrics.ttft.observe(now - times.arrival)
            else:
                self.metrics.itl.observe(now - times.last_token)
        if out.new_token_ids:
            times.last_token = now
        if out.finished:
            del self._requests[out.request_id]
            if self.metrics is not None:
                self.metrics.e2e.observe(now - times.arrival)
            self._finished(out.finish_reason or FinishReason.ABORT)

    def _finished(self, reason: FinishReason) -> None:
        self._num_finished += 1
        if self.metrics is not None:
            self.metrics.success.labels(reason.value).inc()

    def _trim(self, now: float) -> None:
        while self._tokens and self._tokens[0][0] < now - TOKENS_WINDOW_S:
            self._tokens.popleft()

    def tokens_per_s(self) -> float:
        """Tokens of the iterations that ended in the window, over the time since the first of them ended."""
        self._trim(time.monotonic())
        if len(self._tokens) < 2:
            return 0.0
        span = self._tokens[-1][0] - self._tokens[0][0]
        return sum(n for _, n in list(self._tokens)[1:]) / span if span > 0 else 0.0


def _request_ids(plan: StepPlan) -> list[str]:
    return [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
