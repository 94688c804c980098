"""gRPC edge of the gpu_worker: one Step per engine iteration, run one at a time in the order the calls arrive, or
right after the step a call names (after_step_id, whichever call reaches the worker first): a scheduler that plans
ahead sends the next plan while this one runs, so the next step starts as soon as this one ends. A step runs on the
event loop's own thread when nothing else is on the line (no hand-off to a thread and back, no second thread taking
the interpreter lock in turns with it); calls that take long (Measure, Reset) run on the line's thread, so the event
loop waits at most one step to answer a health check. A plan made ahead (StepPlan.planned_ahead) of a step that did
not run is refused (errors.StepRefused): it assumed that step's output."""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from apex_serve import convert, errors, rpc, tracing
from apex_serve.types import StepOutput, StepPlan
from apex_serve.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from gpu_worker.model_runner import ModelRunner
from gpu_worker.profiling import LayerProfiler

T = TypeVar("T")
AFTER_TIMEOUT_S = 30.0  # how long a step sent after another waits for that one's call


class Turns:
    """The order of the worker's calls: each takes its turn as it arrives, or right after the step it names."""

    def __init__(self) -> None:
        self._last_step: int | None = None  # the step of the latest call to take a turn (None: not a step)
        self._after: dict[int, asyncio.Future[None]] = {}  # calls waiting for a step's turn, by that step

    def take(self, step_id: int | None = None) -> None:
        """The next turn, for step step_id (None: a call that is not a step)."""
        self._last_step = step_id
        waiting = self._after.pop(step_id, None) if step_id is not None else None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def take_after(self, after_step_id: int, step_id: int, timeout_s: float = AFTER_TIMEOUT_S) -> None:
        """take(step_id) right after step after_step_id took its turn, waiting for that call if it has not come yet;
        StepRefused if it does not come within timeout_s, or another call took a turn after it."""
        if self._last_step != after_step_id:
            waiting = self._after.setdefault(after_step_id, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(waiting, timeout_s)
            except TimeoutError:
                raise errors.StepRefused(f"step {step_id} was sent after step {after_step_id}, which did not come "
                                         f"within {timeout_s} s") from None
            finally:
                self._after.pop(after_step_id, None)
            if self._last_step != after_step_id:
                raise errors.StepRefused(f"step {step_id} was sent after step {after_step_id}, but another call "
                                         "came between them")
        self.take(step_id)


class StepLine:
    """The worker's calls, run one at a time on a thread of their own in the order they are put on the line (the
    order of their turns: a caller puts a call on as it takes its turn, with no await between): a call put on while
    another runs starts as soon as that one ends. The event loop stays free to answer health checks meanwhile; a
    short call on an empty line may run on the caller's thread instead (run_here)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steps")
        self._ran = True  # whether the latest call ran its step (True before the first)
        self._put = 0  # calls put on the line (counted by the putting thread only)
        self._ended = 0  # of those, calls that ended (counted by the line's thread only): neither count loses an update

    def put(self, work: Callable[[bool], tuple[T, bool]], cancelled: threading.Event | None = None
            ) -> "asyncio.Future[T]":
        """work(whether the call before it ran its step) -> (its result, whether it ran its step), put on the line now;
        its result, or what it raised (its step not run). Where `cancelled` is set before its turn, it does not run
        and counts as a step that did not."""

        def call() -> T:
            try:
                if cancelled is not None and cancelled.is_set():
                    self._ran = False
                    raise asyncio.CancelledError
                return self._call(work)
            finally:
                self._ended += 1

        self._put += 1
        return asyncio.wrap_future(self._thread.submit(call))

    def _call(self, work: Callable[[bool], tuple[T, bool]]) -> T:
        ran, self._ran = self._ran, False
        result, self._ran = work(ran)
        return result

    async def run_here(self, work: Callable[[bool], tuple[T, bool]]) -> T:
        """work's result, work run on the calling thread at once where the line is empty (every call put on it has
        ended), else put on the line (run). Called from the thread that puts calls on the line."""
        if self._ended == self._put:
            return self._call(work)
        return await self.run(work)

    async def run(self, work: Callable[[bool], tuple[T, bool]]) -> T:
        """put(work) and its result; a call cancelled before its turn does not run."""
        cancelled = threading.Event()
        future = self.put(work, cancelled)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            future.add_done_callback(_outcome_dropped)
            raise


def _outcome_dropped(future: "asyncio.Future[object]") -> None:
    """A cancelled call's outcome, which nobody awaits: retrieved so that asyncio does not log it as lost."""
    if not future.cancelled():
        future.exception()


def failed_step_reply(step_id: int, exc: BaseException) -> gpu_worker_pb2.StepResponse:
    """The Steps reply of a step that failed with exc: the status code, details and error kind Step would have ended
    with."""
    code, details, kind = rpc.error_status(exc)
    return gpu_worker_pb2.StepResponse(step_id=step_id, error_code=code.value[0], error_message=details,
                                       error_kind=kind)


def in_turn(plan: StepPlan, previous_ran: bool) -> StepPlan:
    """The plan, to run after a call that ran its step or not; StepRefused if it was made ahead of one that did
    not."""
    if not previous_ran and plan.planned_ahead:
        raise errors.StepRefused(f"step {plan.step_id} was planned ahead of a step that failed")
    return plan


class GpuWorkerServicer(gpu_worker_pb2_grpc.GpuWorkerServicer):
    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._profiler = LayerProfiler(runner)
        self._turns = Turns()  # the runner's state advances one call at a time, in order of arrival
        self._line = StepLine()
        self._tracer = tracing.tracer(__name__)

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._runner.info)

    async def Step(
        self, request: gpu_worker_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.StepResponse:
        return convert.step_output_to_pb(await self._step(request))

    async def Steps(
        self, request_iterator: AsyncIterator[gpu_worker_pb2.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gpu_worker_pb2.StepResponse]:
        """Each plan's reply before the next plan is read: a plan sent ahead waits in the stream's buffer meanwhile,
        and its step starts as soon as the reply is on its way."""
        async for request in request_iterator:
            span = self._span(request.trace_context)
            with trace.use_span(span, end_on_exit=True):
                try:
                    reply = convert.step_output_to_pb(await self._step(request))
                except Exception as exc:  # every failure of a step is its reply
                    reply = failed_step_reply(request.step_id, exc)
                span.set_status(Status(StatusCode.ERROR if reply.error_code else StatusCode.OK))
            yield reply

    def _span(self, carrier: Mapping[str, str]) -> trace.Span:
        """The worker's span of a step on the Steps stream, a child of the iteration whose context it carries
        (INVALID_SPAN, which records nothing: tracing off, or an untraced step)."""
        if self._tracer is None or not carrier:
            return trace.INVALID_SPAN
        return self._tracer.start_span(tracing.STEP_SPAN, propagate.extract(carrier), trace.SpanKind.SERVER)

    async def _take_turn(self, request: gpu_worker_pb2.StepRequest) -> StepPlan:
        """The request's plan, its turn taken (right after the step it names, or now)."""
        plan = convert.plan_from_pb(request)
        if request.HasField("after_step_id"):
            await self._turns.take_after(request.after_step_id, plan.step_id)
        else:
            self._turns.take(plan.step_id)
        return plan

    async def _step(self, request: gpu_worker_pb2.StepRequest) -> StepOutput:
        """The request's step, run in its turn (here where the line is empty); raises where the plan, its turn or the
        step failed."""
        plan = await self._take_turn(request)
        return await self._line.run_here(lambda ran: (self._runner.execute(in_turn(plan, ran)), True))

    async def Reset(
        self, request: gpu_worker_pb2.ResetRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.ResetResponse:
        self._turns.take()
        # nothing made ahead of a reset holds
        return gpu_worker_pb2.ResetResponse(num_dropped=await self._line.run(lambda ran: (self._runner.reset(), False)))

    async def Measure(
        self, request: common_pb2.MeasureRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.MeasureResponse:
        points = convert.measure_points_from_pb(request)
        self._turns.take()
        ns = await self._line.run(  # the requests' state is as the step before left it
            lambda ran: (self._profiler.measure(request.table, points, request.warmup, request.repeats), ran))
        return common_pb2.MeasureResponse(median_ns=ns)
