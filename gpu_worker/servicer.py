"""gRPC edge of the gpu_worker: one Step per engine iteration."""

import asyncio

import grpc

from apex_serve import convert
from apex_serve.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from gpu_worker.model_runner import ModelRunner
from gpu_worker.profiling import LayerProfiler


class GpuWorkerServicer(gpu_worker_pb2_grpc.GpuWorkerServicer):
    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._profiler = LayerProfiler(runner)
        self._lock = asyncio.Lock()  # the runner's state advances one step at a time

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._runner.info)

    async def Step(
        self, request: gpu_worker_pb2.StepRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.StepResponse:
        plan = convert.plan_from_pb(request)
        async with self._lock:
            # In a thread, so the event loop keeps answering health checks during a prefill.
            output = await asyncio.to_thread(self._runner.execute, plan)
        return convert.step_output_to_pb(output)

    async def Reset(
        self, request: gpu_worker_pb2.ResetRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.ResetResponse:
        async with self._lock:
            return gpu_worker_pb2.ResetResponse(num_dropped=self._runner.reset())

    async def Measure(
        self, request: common_pb2.MeasureRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.MeasureResponse:
        points = convert.measure_points_from_pb(request)
        async with self._lock:
            ns = await asyncio.to_thread(self._profiler.measure, request.table, points, request.warmup, request.repeats)
        return common_pb2.MeasureResponse(median_ns=ns)
