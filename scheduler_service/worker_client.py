"""The scheduler's client of the gpu_worker: domain types in, domain types out, and the worker's failures as
domain errors (scheduler_service.worker_port)."""

import grpc

from apex_serve import convert, errors, rpc
from apex_serve.types import StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from scheduler_service.worker_port import GpuWorkerLost


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
        try:
            reply = await self._stub.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest())
        except grpc.aio.AioRpcError as exc:
            await self._raise_domain_error(exc)
            raise
        return convert.worker_info_from_pb(reply)

    async def step(self, plan: StepPlan) -> StepOutput:
        """errors.CpuPoolLost if the worker lost its CPU pool in the step, GpuWorkerLost if the worker is gone."""
        try:
            reply = await self._stub.Step(convert.plan_to_pb(plan))
        except grpc.aio.AioRpcError as exc:
            await self._raise_domain_error(exc)
            raise
        return convert.step_output_from_pb(reply)

    async def reset(self) -> int:
        """Drop the state of every request on the worker; how many it held."""
        try:
            reply = await self._stub.Reset(gpu_worker_pb2.ResetRequest())
        except grpc.aio.AioRpcError as exc:
            await self._raise_domain_error(exc)
            raise
        return reply.num_dropped

    async def close(self) -> None:
        await self._channel.close()

    async def _raise_domain_error(self, exc: grpc.aio.AioRpcError) -> None:
        """Raises the domain error the failed call stands for, if one does."""
        if rpc.error_kind(exc) == errors.CpuPoolLost.kind:
            raise errors.CpuPoolLost(exc.details() or "the CPU pool was lost") from exc
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            old = self._channel
            self._open()
            await old.close()
            raise GpuWorkerLost(f"gpu_worker at {self._address}: {exc.details()}") from exc
