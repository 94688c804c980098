"""gRPC edge of the scheduler: Submit streams a request's tokens (UNAVAILABLE while the gpu_worker is away); Attach
carries many requests on one stream, their outputs batched per step; Abort frees a request at once; GetWorkerInfo
answers the worker as the scheduler uses it now; GetMetrics answers the engine's Prometheus families."""

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from prometheus_client.registry import Collector

from apex_serve import convert, convert_stats, errors, metric_families
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.attach import AttachSession
from scheduler_service.engine_loop import EngineLoop


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: EngineLoop, metrics: Collector, tracer: trace.Tracer | None = None) -> None:
        self._loop = loop
        self._metrics = metrics
        self._tracer = tracer

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        if not request.request_id:
            raise errors.InvalidArgument("request_id", "must not be empty")
        sampling = convert.sampling_from_pb(request.sampling)
        queue = self._loop.submit(
            request.request_id, list(request.prompt_token_ids), sampling, trace.get_current_span().get_span_context()
        )
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield convert.request_output_to_pb(out)
        finally:
            if not finished:  # the client went away or cancelled: free the blocks now
                self._loop.abort(request.request_id)

    async def Attach(
        self, request_iterator: AsyncIterator[scheduler_pb2.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.OutputBatch]:
        async for batch in AttachSession(self._loop, self._tracer).serve(request_iterator):
            yield batch

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(aborted=self._loop.abort(request.request_id))

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        return convert_stats.scheduler_stats_to_pb(self._loop.scheduler.stats(), self._loop.observer.stats())

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._loop.scheduler.worker_info)

    async def GetMetrics(
        self, request: scheduler_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetMetricsResponse:
        return metric_families.to_pb(self._metrics.collect())
