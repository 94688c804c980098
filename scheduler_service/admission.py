"""Step 3 of scheduler_service.scheduler's docstring, its second half: waiting requests admitted FCFS under what the
step's token budget leaves, each placed on a pool with the blocks of all its known tokens and given its first prefill
chunk (scheduler_service.prefill), until the first that does not fit."""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

from apex_serve.types import Placement
from scheduler_service.cpu_placement import CpuPlacement
from scheduler_service.cpu_queue import prefix_contexts
from scheduler_service.decision import Candidates, DeviceRows
from scheduler_service.kv_manager import KVManager
from scheduler_service.prefill import Chunk, ChunkShape, Prefilling
from scheduler_service.request import Request, RequestStatus


@dataclass(frozen=True)
class Steady:
    """The decode iterations after this one, as admission prices them: every running request a row."""

    gpu: DeviceRows
    cpu_context: list[int]  # prefix sums of the CPU rows' contexts
    paged: bool  # the accelerator's decode attention reads each row's own context, else pads to the longest

    @property
    def gpu_rows(self) -> int:
        return self.gpu.rows

    @property
    def gpu_kv_tokens(self) -> int:
        return self.gpu.kv_tokens(self.paged)

    def with_request(self, request: Request, placement: Placement) -> "Steady":
        """With the request decoding on `placement` at its next token."""
        n = request.num_tokens + 1
        if placement is Placement.GPU:
            return Steady(self.gpu.add(n), self.cpu_context, self.paged)
        return Steady(self.gpu, [*self.cpu_context, self.cpu_context[-1] + n], self.paged)


class Admission:
    """The admissions of one policy on one pair of pools (made anew with the CpuPlacement)."""

    def __init__(self, max_num_seqs: int, kv: KVManager, cpu: CpuPlacement, prefilling: Prefilling,
                 paged: bool) -> None:
        self.max_num_seqs = max_num_seqs
        self._paged = paged  # the accelerator's decode attention reads each row's own context (Steady)
        self._kv = kv
        self._cpu = cpu
        self._policy = cpu.policy
        self._prefilling = prefilling

    def admit(self, waiting: deque[Request], budget: int, continuing: Sequence[Chunk], gpu_running: list[Request],
              cpu_queue: deque[Request], gpu: DeviceRows, ridge: int) -> list[Chunk]:
        """Admit from the front of `waiting`, each with the blocks of all its tokens and a first chunk of what the
        budget leaves (a prompt longer than the ridge, the policy's chunk_tokens, while the pools could not take the
        request behind it too: of what the ridge leaves beside the continuing chunks; any other prompt whole), while
        fewer than max_num_seqs run; the continuing chunks and the accelerator rows (gpu) already take their part of
        the step. A request placed on the CPU pool is admitted only where the policy admits it (its latency objective).
        While the CPU pool is lost, a request that can run only there keeps its place and lets the others pass: it
        would otherwise hold up the whole queue until the pool returns. A request preempted while a step that samples
        for it runs waits for that token (the queue behind it too): its recompute starts from every token it has."""
        admitted: list[Chunk] = []
        if not waiting or budget <= 0:
            return admitted
        head = waiting[0]
        if not self._policy.uses_cpu and not self._kv.can_allocate(Placement.GPU, head.num_tokens):
            return admitted  # the accelerator is the only pool and the head does not fit it: FCFS stops here
        shape = ChunkShape.of(continuing)
        prefill_lens, contexts = shape.lens, list(shape.contexts or (0,) * len(continuing))
        max_rows = self._cpu.max_rows
        pending = [*self._prefilling, *(c.request for c in continuing if c.last)]  # not yet decoding
        gpu_residents = gpu_running + [r for r in pending if r.placement is Placement.GPU]
        cpu_context = prefix_contexts(islice(cpu_queue, 2 * max_rows)) if self._policy.uses_cpu else [0]
        steady = Steady(gpu, cpu_context, self._paged)
        for request in pending:
            steady = steady.with_request(request, request.placement)
        num_cpu = len(cpu_queue) + sum(r.placement is Placement.CPU for r in pending)
        running = len(gpu_running) + len(cpu_queue) + len(self._prefilling)
        cpu_lost = not self._kv.num_total(Placement.CPU)
        ridge_left = ridge - sum(prefill_lens)
        i = 0
        while i < len(waiting) and running < self.max_num_seqs and budget > 0:
            request = waiting[i]
            if request.num_pending:  # preempted with a token in flight: admitted once that token is known
                break
            if cpu_lost and self._cpu.must_take(request):
                i += 1
                continue
            placement = self._placement(request, waiting, steady.cpu_context, num_cpu, gpu_residents)
            if placement is None:
                break
            after = steady.with_request(request, placement)
            spread = request.num_tokens > ridge and not self._room_beyond(
                i, placement, waiting, after.cpu_context, num_cpu, gpu_residents, running)
            first = min(budget, ridge_left) if spread else budget
            if first <= 0:  # a long prompt, the pools full and the ridge spent: FCFS waits for the next step
                break
            tokens = min(request.num_tokens, first)
            if running and placement is Placement.CPU and not self._policy.admits(
                Candidates(prefill_lens + [tokens], gpu.rows, gpu.kv_tokens(self._paged), [0], 0, max_rows,
                           (*contexts, 0), shape.loaded_tokens),
                Candidates([], after.gpu_rows, after.gpu_kv_tokens, after.cpu_context, 0, max_rows),
            ):
                break
            steady = after
            del waiting[i]
            self._kv.allocate(request, placement, request.num_tokens)
            request.status = RequestStatus.RUNNING
            request.on_worker = True
            if placement is Placement.GPU:
                gpu_residents.append(request)
            else:
                num_cpu += 1
            admitted.append(self._prefilling.start(request, first))
            if spread:
                ridge_left -= tokens
            prefill_lens.append(tokens)
            contexts.append(0)
            budget -= tokens
            running += 1
        return admitted

    def _room_beyond(self, i: int, placement: Placement, waiting: deque[Request], cpu_context: list[int], num_cpu: int,
                     gpu_residents: list[Request], running: int) -> bool:
        """Whether the pools would take the request after waiting[i] too, waiting[i] placed on `placement` (its blocks
        held for the test, then given back). Then the batch can still grow, and spreading waiting[i]'s prompt would
        hold back the admissions behind it; the ridge is for full pools, where the requests that finish make room for
        one prompt at a time."""
        if i + 1 >= len(waiting) or running + 1 >= self.max_num_seqs or waiting[i + 1].num_pending:
            return False
        request, held = waiting[i], waiting[i].placement
        self._kv.allocate(request, placement, request.num_tokens)
        on_cpu = placement is Placement.CPU
        room = self._placement(waiting[i + 1], waiting, cpu_context, num_cpu + on_cpu,
                               gpu_residents if on_cpu else [*gpu_residents, request]) is not None
        self._kv.free(request)
        request.placement = held
        return room

    def _placement(self, request: Request, waiting: deque[Request], cpu_context: list[int], num_cpu: int,
                   gpu_residents: list[Request]) -> Placement | None:
        """Where an admitted request's KV goes, num_cpu requests living on the CPU and gpu_residents on the
        accelerator (this step's admissions included); None while it fits nowhere."""
        cpu = self._cpu
        if cpu.must_take(request):
            return Placement.CPU if cpu.has_room(request, num_cpu) else None
        if self._kv.can_allocate(Placement.GPU, request.num_tokens):
            return Placement.GPU
        return Placement.CPU if cpu.takes(request, gpu_residents, waiting, cpu_context, num_cpu) else None
