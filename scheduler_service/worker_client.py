"""The scheduler's client of the gpu_worker: domain types in, domain types out, and the worker's failures as
domain errors (scheduler_service.worker_port)."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from apex_serve import convert, errors, rpc
from apex_serve.types import StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from scheduler_service.worker_port import GpuWorkerLost

T = TypeVar("T")


class WorkerClient:
    """A WorkerPort over gRPC. A call that finds the worker gone (UNAVAILABLE) raises GpuWorkerLost and opens a new
    channel, so the next call connects at once to a restarted worker rather than after the old channel's backoff."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._open()

    def _open(self) -> None:
        self._channel = rpc.channel(self._address)
        self._stub = gpu_worker_pb2_grpc.GpuWorkerStub(self._channel)

    async def info(self) -> WorkerInfo:
        return convert.worker_info_from_pb(await self._call(self._stub.GetWorkerInfo(
            gpu_worker_pb2.GetWorkerInfoRequest())))

    async def step(self, plan: StepPlan) -> StepOutput:
        """errors.CpuPoolLost if the worker lost its CPU pool in the step, GpuWorkerLost if the worker is gone."""
        return convert.step_output_from_pb(await self._call(self._stub.Step(convert.plan_to_pb(plan))))

    def submit(self, plan: StepPlan, after_step_id: int | None = None) -> "asyncio.Task[StepOutput]":
        """Send the plan, to run right after step after_step_id (None: in order of arrival); the task that awaits
        its output (the errors of step())."""
        request = convert.plan_to_pb(plan)
        if after_step_id is not None:
            request.after_step_id = after_step_id
        return asyncio.create_task(self._output(self._stub.Step(request)))

    async def _output(self, call: Awaitable[gpu_worker_pb2.StepResponse]) -> StepOutput:
        try:
            return convert.step_output_from_pb(await self._call(call))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the caller cancelled it
                raise
            # its channel was closed under it: another call found the worker gone
            raise GpuWorkerLost(f"gpu_worker at {self._address}: the step's call ended with its channel") from None

    async def reset(self) -> int:
        """Drop the state of every request on the worker; how many it held."""
        return (await self._call(self._stub.Reset(gpu_worker_pb2.ResetRequest()))).num_dropped

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, call: Awaitable[T]) -> T:
        """The call's reply; a failure as the domain error it stands for, if one does."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            kind = rpc.error_kind(exc)
            if kind == errors.CpuPoolLost.kind:
                raise errors.CpuPoolLost(exc.details() or "the CPU pool was lost") from exc
            if kind == errors.StepRefused.kind:
                raise errors.StepRefused(exc.details() or "the step was refused") from exc
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                old = self._channel
                self._open()
                await old.close()
                raise GpuWorkerLost(f"gpu_worker at {self._address}: {exc.details()}") from exc
            raise
