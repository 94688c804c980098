"""gRPC edge of the scheduler: Submit streams a request's tokens; Abort frees it at once."""

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from apex_serve import convert, errors, overlap
from apex_serve.types import Placement, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.iteration_record import IterationRecord
from scheduler_service.telemetry.observer import IterationTimeline


def _overlap_to_pb(o: overlap.Overlap) -> scheduler_pb2.Overlap:
    return scheduler_pb2.Overlap(
        hidden_ratio=o.hidden_ratio, cpu_attention_ns=o.cpu_attention_ns, hidden_ns=o.hidden_ns,
        device_idle_ns=o.device_idle_ns, cpu_idle_ns=o.cpu_idle_ns,
    )


def _iteration_to_pb(record: IterationRecord) -> scheduler_pb2.IterationStats:
    return scheduler_pb2.IterationStats(
        step_id=record.step_id, mode=convert.mode_to_pb(record.mode), num_prefills=record.num_prefills,
        gpu_rows=record.gpu_rows, cpu_rows=record.cpu_rows, cpu_sat_out=record.cpu_sat_out,
        swaps_out=record.swaps_out, swaps_in=record.swaps_in, preemptions=record.preemptions,
        predicted_ns=record.predicted_ns or 0.0, measured_ns=record.measured_ns or 0.0,
        overlap=None if record.overlap is None else _overlap_to_pb(record.overlap),
    )


def _timeline_to_pb(t: IterationTimeline) -> scheduler_pb2.IterationTimeline:
    return scheduler_pb2.IterationTimeline(
        step_id=t.step_id, mode=convert.mode_to_pb(t.mode), start_unix_ns=t.start_unix_ns,
        end_unix_ns=t.end_unix_ns, subtasks=[convert.subtask_to_pb(s) for s in t.subtasks],
        overlap=_overlap_to_pb(t.overlap),
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

    async def Abort(
        self, request: scheduler_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(aborted=self._loop.abort(request.request_id))

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        s = self._loop.scheduler
        observer = self._loop.observer
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
            latest_timeline=None if observer.latest_timeline is None else _timeline_to_pb(observer.latest_timeline),
            tokens_per_s=observer.tokens_per_s(),
            num_finished=observer.num_finished,
            prompt_tokens=observer.prompt_tokens,
            generation_tokens=observer.generation_tokens,
        )

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(self._worker)
