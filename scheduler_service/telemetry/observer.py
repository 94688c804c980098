"""What the engine loop reports about itself: per-request latencies (TTFT, inter-token, end-to-end, queue time),
per-iteration overlap and mode, tokens/s, the latest sampled iteration's timeline, Prometheus metrics and trace
spans. Pure bookkeeping beside the loop; metrics and tracing are optional."""

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from apex_serve import overlap
from apex_serve.types import ExecutionMode, FinishReason, RequestOutput, StepOutput, StepPlan, Subtask
from scheduler_service.telemetry.spans import IterateFn, IterationSpans
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.scheduler import Scheduler

TOKENS_WINDOW_S = 10.0  # tokens/s is measured over this much of the recent past


@dataclass(frozen=True)
class IterationTimeline:
    """The per-layer subtasks of one sampled iteration."""

    step_id: int
    mode: ExecutionMode
    start_unix_ns: int
    end_unix_ns: int
    subtasks: tuple[Subtask, ...]
    overlap: overlap.Overlap


@dataclass
class _RequestTimes:
    arrival: float  # time.monotonic()
    trace_context: SpanContext
    scheduled: float | None = None
    last_token: float | None = None


class EngineObserver:
    def __init__(
        self, scheduler: Scheduler, sample_layers_every: int = 0, metrics: EngineMetrics | None = None,
        spans: IterationSpans | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._sample_every = sample_layers_every
        self.metrics = metrics
        self._spans = spans
        self._requests: dict[str, _RequestTimes] = {}
        self._tokens: deque[tuple[float, int]] = deque()  # (time, tokens produced by an iteration)
        self.latest_timeline: IterationTimeline | None = None
        self.num_finished = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def submitted(self, request_id: str, num_prompt_tokens: int, trace_context: SpanContext | None) -> None:
        self._requests[request_id] = _RequestTimes(time.monotonic(), trace_context or INVALID_SPAN_CONTEXT)
        self.prompt_tokens += num_prompt_tokens
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(num_prompt_tokens)

    def aborted(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._finished(FinishReason.ABORT)

    def sampled(self, plan: StepPlan) -> StepPlan:
        """The plan, asking for per-layer subtask intervals on every Nth iteration."""
        if self._sample_every and plan.step_id % self._sample_every == 0:
            return replace(plan, record_subtasks=True)
        return plan

    async def iterate(self, plan: StepPlan, iterate: IterateFn) -> tuple[StepOutput, list[RequestOutput]]:
        """Runs the iteration (in an iteration span when tracing is on); marks first-scheduled times."""
        now = time.monotonic()
        for new in plan.new_requests:
            times = self._requests.get(new.request_id)
            if times is not None and times.scheduled is None:
                times.scheduled = now
                if self.metrics is not None:
                    self.metrics.queue.observe(now - times.arrival)
        if self._spans is None or plan.is_empty:  # a plan that only frees requests is no iteration
            return await iterate(plan)
        contexts = [self._requests[r].trace_context for r in _request_ids(plan) if r in self._requests]
        return await self._spans.iterate(plan, self._scheduler.record_of(plan), contexts, iterate)

    def stepped(self, plan: StepPlan, output: StepOutput, outputs: Sequence[RequestOutput]) -> None:
        """After update_from_output: the iteration's metrics, its timeline when sampled, and each request's
        latencies."""
        if plan.is_empty:
            return
        record = self._scheduler.record_of(plan)
        if output.subtasks:
            t = output.timings
            self.latest_timeline = IterationTimeline(
                plan.step_id, plan.mode, t.start_unix_ns, t.start_unix_ns + t.total_ns, output.subtasks,
                overlap.from_subtasks(output.subtasks),
            )
        if self.metrics is not None and record is not None and record.overlap is not None:
            self.metrics.iteration(plan.mode, output.timings.total_ns / 1e9, record.overlap, record.preemptions)
        now = time.monotonic()
        produced = 0
        for out in outputs:
            produced += len(out.new_token_ids)
            self._token_times(out, now)
        self.generation_tokens += produced
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
        self.num_finished += 1
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
