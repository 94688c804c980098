"""The scheduler's client of the gpu_worker: domain types in, domain types out, and the worker's failures as
domain errors (scheduler_service.worker_port)."""

import asyncio
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

import grpc
from opentelemetry import propagate

from apex_serve import convert, errors, rpc, tracing
from apex_serve.types import StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from scheduler_service.step_stream import StepStream
from scheduler_service.worker_port import GpuWorkerLost

T = TypeVar("T")


class WorkerClient:
    """A WorkerPort over gRPC. A call that finds the worker gone (UNAVAILABLE) raises GpuWorkerLost and opens a new
    channel, so the next call connects at once to a restarted worker rather than after the old channel's backoff."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._traced = tracing.tracer(__name__) is not None
        self._open()

    def _open(self) -> None:
        self._channel = rpc.channel(self._address)
        self._stub = gpu_worker_pb2_grpc.GpuWorkerStub(self._channel)
        self._steps: StepStream | None = None  # opened by the first submit(), and again after it ends

    async def info(self) -> WorkerInfo:
        return convert.worker_info_from_pb(await self._call(self._stub.GetWorkerInfo(
            gpu_worker_pb2.GetWorkerInfoRequest())))

    async def step(self, plan: StepPlan) -> StepOutput:
        """errors.CpuPoolLost if the worker lost its CPU pool in the step, GpuWorkerLost if the worker is gone."""
        return convert.step_output_from_pb(await self._call(self._stub.Step(convert.plan_to_pb(plan))))

    def submit(self, plan: StepPlan, after_step_id: int | None = None) -> "asyncio.Task[StepOutput]":
        """Send the plan on the Steps stream, to run right after step after_step_id (None: in order of arrival); the
        task that awaits its output (the errors of step()). Cancelling the task does not take the plan back."""
        request = convert.plan_to_pb(plan)
        if after_step_id is not None:
            request.after_step_id = after_step_id
        if self._traced:
            propagate.inject(request.trace_context)  # the iteration's span, current at the caller
        if self._steps is None or self._steps.ended:
            self._steps = StepStream(self._stub)
        return asyncio.create_task(self._output(self._steps.send(request), self._channel))

    async def _output(self, reply: Awaitable[gpu_worker_pb2.StepResponse], channel: grpc.aio.Channel) -> StepOutput:
        try:
            response = await reply
        except grpc.aio.AioRpcError as exc:  # the stream ended before the reply (UNAVAILABLE: StepStream)
            if channel is not self._channel:  # another call found the worker gone and opened a new channel
                raise GpuWorkerLost(f"gpu_worker at {self._address}: {exc.details()}") from None
            await self._fail(exc)
        if response.error_code:
            await self._fail(rpc.rpc_error(response.error_code, response.error_message, response.error_kind))
        return convert.step_output_from_pb(response)

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
            await self._fail(exc)

    async def _fail(self, exc: grpc.aio.AioRpcError) -> NoReturn:
        """Raise the domain error a failed call (or step) stands for, exc itself where none does; a worker gone
        (UNAVAILABLE) also opens a new channel."""
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
        raise exc
