"""gRPC edge of the gpu_worker: one Step per engine iteration, run one at a time in the order the calls arrive, or
right after the step a call names (after_step_id, whichever call reaches the worker first): a scheduler that plans
ahead sends the next plan while this one runs, so the next step starts as soon as this one ends, on the same thread,
with no round trip and no hop through the event loop between them. A plan made ahead (StepPlan.planned_ahead) of a
step that did not run is refused (errors.StepRefused): it assumed that step's output."""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from apex_serve import convert, errors
from apex_serve.types import StepPlan
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
    another runs starts as soon as that one ends. The event loop stays free to answer health checks meanwhile."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steps")
        self._ran = True  # whether the latest call ran its step (True before the first)

    async def run(self, work: Callable[[bool], tuple[T, bool]]) -> T:
        """work(whether the call before it ran its step) -> (its result, whether it ran its step), run in turn; what
        work raises is raised, its step not run. A call cancelled before its turn does not run, and counts as a step
        that did not."""
        cancelled = threading.Event()

        def call() -> T:
            ran, self._ran = self._ran, False
            if cancelled.is_set():
                raise asyncio.CancelledError
            result, self._ran = work(ran)
            return result

        future = asyncio.wrap_future(self._thread.submit(call))
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

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._runner.info)

    async def Step(
        self, request: gpu_worker_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.StepResponse:
        plan = convert.plan_from_pb(request)
        if request.HasField("after_step_id"):
            await self._turns.take_after(request.after_step_id, plan.step_id)
        else:
            self._turns.take(plan.step_id)
        output = await self._line.run(lambda ran: (self._runner.execute(in_turn(plan, ran)), True))
        return convert.step_output_to_pb(output)

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
