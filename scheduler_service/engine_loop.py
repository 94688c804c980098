"""The engine loop: schedule, one Step on the gpu_worker, update, stream. One iteration at a time."""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from opentelemetry.trace import SpanContext

from apex_serve.types import FinishReason, RequestOutput, SamplingParams, StepOutput, StepPlan
from scheduler_service.scheduler import Scheduler
from scheduler_service.telemetry.observer import EngineObserver

logger = logging.getLogger(__name__)

StepFn = Callable[[StepPlan], Awaitable[StepOutput]]  # the gpu_worker's Step
Outcome = RequestOutput | Exception


class EngineLoop:
    """Owns the Scheduler; callers submit requests and read their outputs from a queue. Each iteration: schedule,
    begin (the observer), Step, update (the scheduler), end (the observer), deliver."""

    def __init__(self, scheduler: Scheduler, step: StepFn, observer: EngineObserver | None = None) -> None:
        self._scheduler = scheduler
        self._step = step
        self.observer = observer or EngineObserver()
        self._streams: dict[str, asyncio.Queue[Outcome]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Stop the loop, end every stream with ABORT, and send the worker one last plan that drops their state (a
        scheduler started later against the same worker finds it holding nothing)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request_id in dict.fromkeys([*self._streams, *self._scheduler.request_ids()]):
            self._drop(request_id, _aborted(request_id))
        plan = self._scheduler.schedule()
        if plan.freed_request_ids:
            try:
                await asyncio.wait_for(self._step(plan), flush_timeout_s)
            except Exception:  # the worker is gone or failing: nothing more to free
                logger.warning("could not drop %d requests from the worker on stop", len(plan.freed_request_ids))

    def submit(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
        trace_context: SpanContext | None = None,
    ) -> asyncio.Queue[Outcome]:
        """Queues a request; raises InvalidArgument / ResourceExhausted from the scheduler. The iterations that serve
        it link to trace_context (the caller's span) when tracing is on."""
        self._scheduler.add_request(request_id, prompt_token_ids, sampling)
        self.observer.submitted(request_id, len(prompt_token_ids), trace_context)
        queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self._streams[request_id] = queue
        self._wake.set()
        return queue

    def abort(self, request_id: str) -> bool:
        """Frees the request's blocks at once and ends its stream with FinishReason.ABORT."""
        aborted = self._drop(request_id, _aborted(request_id))
        self._wake.set()
        return aborted

    async def _run(self) -> None:
        while True:
            plan = self._scheduler.schedule()
            if plan.is_empty and not plan.freed_request_ids:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._iterate(plan)

    async def _iterate(self, plan: StepPlan) -> None:
        flight = self._scheduler.in_flight
        span = self.observer.begin(plan, None if flight is None else flight.record)
        try:
            output = await self._step(plan)
            result = self._scheduler.update_from_output(plan, output)
        except asyncio.CancelledError:  # stop() during the step
            self.observer.fail(span, None)
            raise
        except Exception as exc:  # the worker failed: fail what was in the step, keep serving
            logger.exception("step %d failed", plan.step_id)
            self.observer.fail(span, exc)
            for request_id in [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]:
                self._drop(request_id, exc)
            return
        self.observer.end(span, plan, output, result)
        for out in result.outputs:
            self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        queue = self._streams.get(out.request_id)
        if queue is None:
            return
        queue.put_nowait(out)
        if out.finished:
            del self._streams[out.request_id]

    def _drop(self, request_id: str, outcome: Outcome) -> bool:
        """Removes the request from the scheduler (freeing its blocks), the observer and the streams, and ends its
        stream with `outcome`; whether the scheduler still held it."""
        held = self._scheduler.abort(request_id)
        self.observer.aborted(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(outcome)
        return held


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, (), finished=True, finish_reason=FinishReason.ABORT)
