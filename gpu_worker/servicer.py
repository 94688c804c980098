"""gRPC edge of the gpu_worker: one Step per engine iteration, run one at a time in the order the calls arrive, or
right after the step a call names (after_step_id, whichever call reaches the worker first): a scheduler that plans
ahead sends the next plan while this one runs, so the next step starts as soon as this one ends, with no round trip
between them. A plan made ahead (StepPlan.planned_ahead) of a step that failed is refused (errors.StepRefused): it
assumed that step's output."""

import asyncio
from collections.abc import Awaitable, Callable
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
    """The worker's calls in order: each waits for the one before it to end and learns whether the state that one
    left is the state a plan made ahead of it assumed (the step ran)."""

    def __init__(self) -> None:
        self._last: asyncio.Future[bool] | None = None
        self._last_step: int | None = None  # the step of the latest call to take a turn (None: not a step)
        self._after: dict[int, asyncio.Future[None]] = {}  # calls waiting for a step's turn, by that step

    def take(self, step_id: int | None = None) -> tuple["asyncio.Future[bool] | None", "asyncio.Future[bool]"]:
        """The turn before this one (None: no call came before) and this one's, to be resolved when it ends."""
        previous, self._last = self._last, asyncio.get_running_loop().create_future()
        self._last_step = step_id
        waiting = self._after.pop(step_id, None) if step_id is not None else None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        return previous, self._last

    async def take_after(self, after_step_id: int, step_id: int, timeout_s: float = AFTER_TIMEOUT_S
                         ) -> tuple["asyncio.Future[bool] | None", "asyncio.Future[bool]"]:
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
        return self.take(step_id)


async def _ended(previous: "asyncio.Future[bool] | None") -> bool:
    """Wait for the turn before (shielded: a cancelled call must not cancel it); whether its step ran."""
    return True if previous is None else await asyncio.shield(previous)


async def step_in_turn(previous: "asyncio.Future[bool] | None", turn: "asyncio.Future[bool]", plan: StepPlan,
                       execute: Callable[[StepPlan], Awaitable[T]]) -> T:
    """Run the plan once the turn before ended (Turns.take), refused (errors.StepRefused) if it was made ahead of
    a step that failed; the turn ends with whether it ran."""
    ran = False
    try:
        if not await _ended(previous) and plan.planned_ahead:
            raise errors.StepRefused(f"step {plan.step_id} was planned ahead of a step that failed")
        output = await execute(plan)
        ran = True
        return output
    finally:
        turn.set_result(ran)


class GpuWorkerServicer(gpu_worker_pb2_grpc.GpuWorkerServicer):
    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._profiler = LayerProfiler(runner)
        self._turns = Turns()  # the runner's state advances one call at a time, in order of arrival

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._runner.info)

    async def Step(
        self, request: gpu_worker_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.StepResponse:
        plan = convert.plan_from_pb(request)
        if request.HasField("after_step_id"):
            previous, turn = await self._turns.take_after(request.after_step_id, plan.step_id)
        else:
            previous, turn = self._turns.take(plan.step_id)
        # In a thread, so the event loop keeps answering health checks during a prefill.
        output = await step_in_turn(previous, turn, plan, lambda p: asyncio.to_thread(self._runner.execute, p))
        return convert.step_output_to_pb(output)

    async def Reset(
        self, request: gpu_worker_pb2.ResetRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.ResetResponse:
        previous, turn = self._turns.take()
        try:
            await _ended(previous)
            return gpu_worker_pb2.ResetResponse(num_dropped=self._runner.reset())
        finally:
            turn.set_result(False)  # nothing made ahead of a reset holds

    async def Measure(
        self, request: common_pb2.MeasureRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.MeasureResponse:
        points = convert.measure_points_from_pb(request)
        previous, turn = self._turns.take()
        ran = False
        try:
            ran = await _ended(previous)  # the requests' state is as the step before left it
            ns = await asyncio.to_thread(self._profiler.measure, request.table, points, request.warmup, request.repeats)
        finally:
            turn.set_result(ran)
        return common_pb2.MeasureResponse(median_ns=ns)
