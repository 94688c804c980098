"""The engine loop: schedule, one Step on the gpu_worker, update, stream.

With asynchronous scheduling (SchedulerConfig.async_scheduling, the default) the loop plans step N+1 while the worker
runs step N and sends it at once, to run right after N (after_step_id), so the worker starts N+1 when N ends, without
waiting for a round trip or for the scheduler's bookkeeping of N. Two steps are then in flight; N's output is taken
(tokens streamed, finishes found) while N+1 runs, and what it finishes reaches the worker with N+2. Without it, one
step at a time. Either way the cost model's online correction from a step's timings is fitted once the next step is
sent (Scheduler.refine), not between a step's output and its tokens or the next plan.

The worker may fail it in three ways. A step fails: its requests fail, the loop serves on. The worker loses its CPU pool
in a step (errors.CpuPoolLost): the scheduler requeues what lived there, the step's accelerator part runs again at once
(nobody fails), and the accelerator alone serves until a CpuPoolWatch poll finds a pool attached again. The worker goes
away (GpuWorkerLost): every request fails with UNAVAILABLE, the service reports NOT_SERVING and refuses requests, and
the loop waits for the worker, Resets it and serves again; if the worker comes back with another model or other
pools, the loop stops the service (WorkerReplaced in `failure`): the scheduler must start anew against it."""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from opentelemetry.trace import SpanContext

from apex_serve import errors
from apex_serve.types import FinishReason, RequestOutput, SamplingParams, StepOutput, StepPlan, WorkerInfo
from scheduler_service.cpu_pool_watch import CpuPoolWatch
from scheduler_service.scheduler import Scheduler
from scheduler_service.telemetry.observer import EngineObserver
from scheduler_service.telemetry.spans import IterationSpan
from scheduler_service.worker_port import GpuWorkerLost, WorkerPort, WorkerReplaced, replacement

logger = logging.getLogger(__name__)
Outcome = RequestOutput | Exception
RECONNECT_FIRST_S = 0.2  # the first wait for a lost worker, doubled after each failed try
RECONNECT_MAX_S = 2.0


class OutcomeSink(Protocol):
    """Where a request's outputs go, then its end (a finished output or an exception); an asyncio.Queue is one."""

    def put_nowait(self, item: Outcome) -> None: ...


class Service(Protocol):
    """The scheduler's gRPC service as the loop drives it (apex_serve.rpc.ServiceRunner)."""

    async def set_serving(self, serving: bool) -> None: ...

    def request_stop(self) -> None: ...


class EngineLoop:
    """Owns the Scheduler; callers submit requests and read their outputs from a queue. Each iteration: schedule,
    begin (the observer), Step, update (the scheduler), end (the observer), deliver."""

    def __init__(self, scheduler: Scheduler, worker: WorkerPort, observer: EngineObserver | None = None,
                 service: Service | None = None, watch: CpuPoolWatch | None = None) -> None:
        self._scheduler = scheduler
        self._ahead = scheduler.config.async_scheduling
        self._unconfirmed_frees: tuple[str, ...] = ()  # freed ids of plans stop() cancelled: maybe never applied
        self._worker = worker
        self.observer = observer or EngineObserver()
        self._service = service
        self._watch = watch or CpuPoolWatch(scheduler, worker)
        self._lost: GpuWorkerLost | None = None  # while the worker is away
        self.failure: WorkerReplaced | None = None  # why the loop stopped serving for good
        self._streams: dict[str, OutcomeSink] = {}
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
        self._watch.close()
        for request_id in dict.fromkeys([*self._streams, *self._scheduler.request_ids()]):
            self._drop(request_id, _aborted(request_id))
        plan = self._scheduler.schedule()
        if self._unconfirmed_frees:  # freeing twice is a no-op on the worker
            plan = replace(plan, freed_request_ids=(*self._unconfirmed_frees, *plan.freed_request_ids))
        if plan.freed_request_ids:
            try:
                await asyncio.wait_for(self._worker.step(plan), flush_timeout_s)
            except Exception:  # the worker is gone or failing: nothing more to free
                logger.warning("could not drop %d requests from the worker on stop", len(plan.freed_request_ids))

    def submit(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
        trace_context: SpanContext | None = None,
    ) -> asyncio.Queue[Outcome]:
        """submit_to() a new queue, returned."""
        queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self.submit_to(queue, request_id, prompt_token_ids, sampling, trace_context)
        return queue

    def submit_to(
        self, sink: OutcomeSink, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams,
        trace_context: SpanContext | None = None,
    ) -> None:
        """Queues a request whose outcomes go to sink; raises InvalidArgument / ResourceExhausted from the scheduler,
        Unavailable while the worker is away. The iterations that serve it link to trace_context (the caller's span)
        when tracing is on."""
        if self._lost is not None or self.failure is not None:
            raise errors.Unavailable(f"the gpu_worker is away ({self.failure or self._lost}): retry later")
        self._scheduler.add_request(request_id, prompt_token_ids, sampling)
        self.observer.submitted(request_id, len(prompt_token_ids), trace_context)
        self._streams[request_id] = sink
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Frees the request's blocks at once and ends its stream with FinishReason.ABORT."""
        aborted = self._drop(request_id, _aborted(request_id))
        self._wake.set()
        return aborted

    async def _run(self) -> None:
        while True:
            try:
                await self._watch.poll()
                plan = self._scheduler.schedule()
                if plan.is_empty and not plan.freed_request_ids:
                    self._wake.clear()
                    try:  # while degraded, wake for the next poll too
                        await asyncio.wait_for(self._wake.wait(), self._watch.wait_s())
                    except TimeoutError:
                        pass
                    continue
                await self._pipeline(plan)
            except GpuWorkerLost as lost:
                if not await self._reconnect(lost):
                    return

    async def _pipeline(self, plan: StepPlan) -> None:
        """The plan's step; with asynchronous scheduling, steps back to back while there is work, each planned and
        sent while the one before runs. Returns when no plan was made ahead (or it was empty), or after a failed
        step."""
        running: _Sent | None = self._send(plan)
        ahead: _Sent | None = None
        try:
            while running is not None:
                if self._ahead and self._scheduler.has_work():
                    await self._watch.poll()
                    following = self._scheduler.schedule()
                    if not following.is_empty or following.freed_request_ids:
                        ahead = self._send(following, running.plan.step_id)
                self._scheduler.refine()  # while the worker runs the step
                if not await self._take(running, ahead):
                    return
                running, ahead = ahead, None
        except asyncio.CancelledError:  # stop(): the worker's answers are not awaited
            for sent in (running, ahead):
                if sent is not None:
                    sent.output.cancel()
                    self._unconfirmed_frees += sent.plan.freed_request_ids
            raise

    def _send(self, plan: StepPlan, after_step_id: int | None = None) -> "_Sent":
        """The plan sent (to run right after step after_step_id), with its iteration's span begun."""
        flight = self._scheduler.in_flight
        span = self.observer.begin(plan, None if flight is None else flight.record)
        with self.observer.current(span):
            output = self._worker.submit(plan, after_step_id)
        return _Sent(plan, span, output)

    async def _take(self, sent: "_Sent", ahead: "_Sent | None", retry: bool = False) -> bool:
        """Take a sent step's output: update, end its span, deliver. If the step failed, the plan sent ahead of it is
        withdrawn (its requests requeued: the worker refuses it, or ran it on a state the scheduler no longer has) and
        the failure handled (_failed; retry: the step was a lost CPU pool's retry); False then."""
        try:
            output = await sent.output
            result = self._scheduler.update_from_output(sent.plan, output, fit_later=True)
        except asyncio.CancelledError:  # stop() during the step
            self.observer.fail(sent.span, None)
            raise
        except Exception as exc:
            self.observer.fail(sent.span, exc)
            if ahead is not None:
                await self._withdraw(ahead)
            await self._failed(sent.plan, exc, retry)
            return False
        self.observer.end(sent.span, sent.plan, output, result)
        for out in result.outputs:
            self._deliver(out)
        return True

    async def _withdraw(self, sent: "_Sent") -> None:
        """The plan sent ahead of a failed step: its outcome awaited (a refusal, normally), then withdrawn."""
        try:
            await sent.output
        except GpuWorkerLost:
            raise
        except Exception as exc:  # errors.StepRefused, or a failure of its own
            self.observer.fail(sent.span, exc)
        else:
            self.observer.fail(sent.span, None)
        self._scheduler.withdraw(sent.plan)

    async def _failed(self, plan: StepPlan, exc: Exception, retry: bool = False) -> None:
        """The plan's step failed (no plan is in flight after it): a lost worker is raised; a lost CPU pool has the
        step's accelerator part run again at once (unless this was that retry); else the step's requests fail."""
        if isinstance(exc, GpuWorkerLost):
            raise exc
        if isinstance(exc, errors.CpuPoolLost) and not retry:
            logger.warning("the gpu_worker lost its CPU pool in step %d (%s): its requests are recomputed on the "
                           "accelerator, which alone serves until the pool is back", plan.step_id, exc)
            self._watch.lost()
            await self._take(self._send(self._scheduler.cpu_pool_lost(plan)), None, retry=True)
            return
        logger.error("step %d failed", plan.step_id, exc_info=exc)  # fail what was in the step, keep serving
        for request_id in [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]:
            self._drop(request_id, exc)

    async def _reconnect(self, lost: GpuWorkerLost) -> bool:
        """The worker went away: fail every request with UNAVAILABLE, report NOT_SERVING, and wait for the worker.
        True once it is back, Reset and SERVING; False if it came back as another worker (the service stops)."""
        self._lost = lost
        request_ids = list(dict.fromkeys([*self._streams, *self._scheduler.request_ids()]))
        logger.error("lost the gpu_worker (%s): %d requests fail, waiting for it to come back", lost, len(request_ids))
        error = errors.Unavailable(f"lost the gpu_worker: {lost}")
        for request_id in request_ids:
            self._drop(request_id, error)
        self._scheduler.worker_lost()
        await self._set_serving(False)
        info = await self._worker_back()
        changed = replacement(self._scheduler.worker_info, info)
        if changed:
            logger.error("the gpu_worker came back as another worker (%s): stopping, to start anew against it", changed)
            self.failure = WorkerReplaced(f"the gpu_worker came back as another worker: {changed}")
            if self._service is not None:
                self._service.request_stop()
            return False
        self._watch.worker_back()
        self._lost = None
        await self._set_serving(True)
        logger.info("the gpu_worker is back: serving")
        return True

    async def _worker_back(self) -> WorkerInfo:
        """The worker's info once it answers again (waits of RECONNECT_FIRST_S doubling to RECONNECT_MAX_S between
        tries), Reset first if it is the same worker."""
        wait_s = RECONNECT_FIRST_S
        while True:
            try:
                info = await self._worker.info()
                if not replacement(self._scheduler.worker_info, info):
                    dropped = await self._worker.reset()
                    logger.info("reset the gpu_worker: it dropped %d requests", dropped)
                return info
            except Exception as exc:  # not back yet, or failing on its way back
                logger.debug("the gpu_worker is not back: %s", exc)
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, RECONNECT_MAX_S)

    async def _set_serving(self, serving: bool) -> None:
        if self._service is not None:
            await self._service.set_serving(serving)

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


@dataclass
class _Sent:
    """A plan the worker has queued: its iteration's span and the task that awaits its output."""

    plan: StepPlan
    span: IterationSpan | None
    output: "asyncio.Task[StepOutput]"


def _aborted(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, (), finished=True, finish_reason=FinishReason.ABORT)
