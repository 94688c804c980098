"""gRPC edge of the gpu_worker: one Step per engine iteration, run in the order the calls arrive.

A Step call answers its initial metadata as soon as it holds its place in that order, so a scheduler that plans ahead
(StepPlan.planned_ahead) may send the next plan the moment the worker has queued this one: the next step starts as
soon as this one ends, with no round trip between them. A plan made ahead of a step that failed is refused
(errors.StepRefused): it assumed that step's output."""

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


class Turns:
    """The worker's calls in order of arrival: each waits for the one before it to end and learns whether the state
    that one left is the state a plan made ahead of it assumed (the step ran)."""

    def __init__(self) -> None:
        self._last: asyncio.Future[bool] | None = None

    def take(self) -> tuple["asyncio.Future[bool] | None", "asyncio.Future[bool]"]:
        """The turn before this one (None: no call came before) and this one's, to be resolved when it ends."""
        previous, self._last = self._last, asyncio.get_running_loop().create_future()
        return previous, self._last


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
        previous, turn = self._turns.take()
        try:
            await context.send_initial_metadata(())  # queued: the client may send the next plan
        except BaseException:
            turn.set_result(False)
            raise
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
