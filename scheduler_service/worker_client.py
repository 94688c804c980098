"""The scheduler's client of the gpu_worker: domain types in, domain types out."""

from apex_serve import convert, rpc
from apex_serve.types import StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc


class WorkerClient:
    def __init__(self, address: str) -> None:
        self._channel = rpc.channel(address)
        self._stub = gpu_worker_pb2_grpc.GpuWorkerStub(self._channel)

    async def info(self) -> WorkerInfo:
        return convert.worker_info_from_pb(await self._stub.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest()))

    async def step(self, plan: StepPlan) -> StepOutput:
        return convert.step_output_from_pb(await self._stub.Step(convert.plan_to_pb(plan)))

    async def close(self) -> None:
        await self._channel.close()
