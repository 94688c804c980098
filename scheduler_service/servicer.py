"""gRPC edge of the scheduler: Submit streams a request's tokens; Abort frees it at once."""

from collections.abc import AsyncIterator

import grpc

from apex_serve import convert, errors
from apex_serve.types import Placement, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.iteration_record import IterationRecord


def _iteration_to_pb(record: IterationRecord) -> scheduler_pb2.IterationStats:
    return scheduler_pb2.IterationStats(
        step_id=record.step_id, mode=convert.mode_to_pb(record.mode), num_prefills=record.num_prefills,
        gpu_rows=record.gpu_rows, cpu_rows=record.cpu_rows, cpu_sat_out=record.cpu_sat_out,
        swaps_out=record.swaps_out, swaps_in=record.swaps_in, preemptions=record.preemptions,
        predicted_ns=record.predicted_ns or 0.0, measured_ns=record.measured_ns or 0.0,
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, loop: EngineLoop, worker: WorkerInfo) -> None:
        self._loop = loop
        self._worker = worker

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        if not request.request_id:
            raise errors.InvalidArgument("request_id", "must not be empty")
        sampling = convert.sampling_from_pb(request.sampling)
        queue = self._loop.submit(request.request_id, list(request.prompt_token_ids), sampling)
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

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(aborted=self._loop.abort(request.request_id))

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        s = self._loop.scheduler
        errors_by_mode = {} if s.cost_model is None else s.cost_model.error_stats()
        return scheduler_pb2.SchedulerStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks,
            num_total_blocks=s.num_total_blocks,
            num_steps=s.num_steps,
            num_preemptions=s.num_preemptions,
            policy=s.config.policy,
            iterations_by_mode={mode.value: n for mode, n in s.iterations_by_mode.items()},
            num_running_cpu=s.num_running_on(Placement.CPU),
            num_free_cpu_blocks=s.num_free(Placement.CPU),
            num_total_cpu_blocks=s.num_total(Placement.CPU),
            num_swaps=s.num_swaps,
            last_iteration=None if s.last_iteration is None else _iteration_to_pb(s.last_iteration),
            cost_model_error=[
                scheduler_pb2.CostModelError(
                    mode=convert.mode_to_pb(mode), count=e.count, raw_mape=e.raw_mape, corrected_mape=e.corrected_mape,
                    recent_corrected_mape=e.recent_corrected_mape,
                )
                for mode, e in errors_by_mode.items()
            ],
            recent_iterations=[_iteration_to_pb(r) for r in s.recent_iterations],
        )

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._worker)
