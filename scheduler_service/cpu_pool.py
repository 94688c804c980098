"""The scheduler's side of a lost CPU pool (DESIGN §2, Failure): the deadline a step gives its CPU rows, the requests a
lost pool takes with it, and the part of the failed step that runs again on the accelerator."""

from collections.abc import Iterable
from dataclasses import dataclass

from apex_serve.engine_stats import IterationRecord
from apex_serve.types import CachedRequestData, ExecutionMode, NewRequestData, StepPlan
from scheduler_service.config import SchedulerConfig
from scheduler_service.decision import Candidates, device_kv_tokens
from scheduler_service.prefill import Chunk, ChunkShape
from scheduler_service.request import Request, RequestStatus


def cpu_deadline_s(config: SchedulerConfig, estimate_ns: float) -> float:
    """Seconds each layer of a step's CPU rows may take (StepPlan.cpu_wait_timeout_s): cpu_deadline_factor times the
    step's time as the policy estimated it (Choice.estimate_ns), within [cpu_deadline_min_s, cpu_deadline_max_s]; the
    maximum without an estimate (0). The estimate, not the corrected prediction: the factor leaves room for either,
    and the prediction is made off the decision path (InFlightStep.prediction)."""
    if estimate_ns <= 0:
        return config.cpu_deadline_max_s
    seconds = config.cpu_deadline_factor * estimate_ns / 1e9
    return min(max(seconds, config.cpu_deadline_min_s), config.cpu_deadline_max_s)


def lost_with_cpu_pool(plan: StepPlan, gpu_running: Iterable[Request], cpu_resident: Iterable[Request]
                       ) -> list[Request]:
    """The running requests a CPU pool lost in `plan`'s step takes with it: every CPU-resident one (the plan's CPU
    admissions and swap-outs among them, and the CPU-placed requests still prefilling) and those the plan swapped in
    to the accelerator."""
    swapped_in = {s.request_id for s in plan.swap_in}
    return [*cpu_resident, *(r for r in gpu_running if r.request_id in swapped_in)]


@dataclass(frozen=True)
class Retry:
    """What of a step that lost the CPU pool runs again, on the accelerator alone, once the requests the pool took
    with it are requeued: the step's accelerator admissions, in full again (the worker dropped them), its accelerator
    rows with their entries as they were (the worker undid their block growth), and the chunks of its accelerator
    requests still prefilling, the same chunks again (the worker did not advance them)."""

    requests: list[Request]  # in plan order
    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    partial: frozenset[Request]  # those whose chunk does not reach the end of their tokens

    @classmethod
    def of(cls, plan: StepPlan, scheduled: Iterable[Request], partial: frozenset[Request]) -> "Retry":
        """From the failed plan, the requests it scheduled and those of them that sample nothing: those still running
        (the requeued and the aborted are not)."""
        requests = [r for r in scheduled if r.status is RequestStatus.RUNNING]
        ids = {r.request_id for r in requests}
        return cls(requests, tuple(n for n in plan.new_requests if n.request_id in ids),
                   tuple(c for c in plan.cached_requests if c.request_id in ids),
                   frozenset(r for r in requests if r in partial))

    def candidates(self, max_cpu_rows: int, paged: bool) -> Candidates:
        """The retry as the policy sees it: prefill chunks and accelerator rows, no CPU candidate (so GPU_ONLY); paged:
        whether the accelerator's decode attention reads each row's own context (device_kv_tokens)."""
        by_id = {r.request_id: r for r in self.requests}
        chunks = [Chunk(by_id[n.request_id], 0, n.num_prefill_tokens) for n in self.new_requests]
        for c in self.cached_requests:
            if c.num_scheduled_tokens:  # the request's computed tokens count the chunk already
                request = by_id[c.request_id]
                chunks.append(Chunk(request, request.num_computed_tokens - c.num_scheduled_tokens,
                                    c.num_scheduled_tokens))
        rows = [by_id[c.request_id] for c in self.cached_requests if not c.num_scheduled_tokens]
        shape = ChunkShape.of(chunks)
        return Candidates(shape.lens, len(rows), device_kv_tokens([r.num_tokens for r in rows], paged), [0], 0,
                          max_cpu_rows, shape.contexts, shape.loaded_tokens)

    def plan(self, step_id: int, freed_request_ids: tuple[str, ...], record_subtasks: bool) -> StepPlan:
        """The retry's plan: GPU_ONLY, no swaps."""
        return StepPlan(step_id=step_id, new_requests=self.new_requests, cached_requests=self.cached_requests,
                        freed_request_ids=freed_request_ids, mode=ExecutionMode.GPU_ONLY,
                        record_subtasks=record_subtasks)

    def record(self, step_id: int, preemptions: int) -> IterationRecord | None:
        """The retry's iteration record (None if nothing runs again); preemptions: the failed plan's and the
        requeued requests."""
        if not self.requests:
            return None
        chunks = sum(1 for c in self.cached_requests if c.num_scheduled_tokens)
        return IterationRecord(step_id=step_id, mode=ExecutionMode.GPU_ONLY,
                               num_prefills=len(self.new_requests) + chunks,
                               gpu_rows=len(self.cached_requests) - chunks, cpu_rows=0, cpu_sat_out=0, swaps_out=0,
                               swaps_in=0, preemptions=preemptions,
                               prefill_tokens=sum(r.num_prefill_tokens for r in self.new_requests)
                               + sum(c.num_scheduled_tokens for c in self.cached_requests))
