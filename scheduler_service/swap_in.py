"""Step 1 of scheduler_service.scheduler's docstring: the CPU requests that move to the accelerator before a step.

Under the Scheduler's own rule (hybrid policies), CPU requests move while the one that sat out longest sits out, ahead
of the waiting requests (as vLLM resumes swapped requests before new prefills): a CPU request the policy gave no row
makes no progress, and the sit-out bound would later force it into a step whose CPU attention it outlasts. While
nothing waits they move too, sat out or not: the accelerator's free room would otherwise stay idle while CPU rows set
the step (the end of a run: the last CPU requests decoding at the CPU's pace beside a near-empty pool); then a request
that did not sit out moves where the accelerator's decode attention is paged or it is no longer than the longest
accelerator row, if any (padded, a longer one lengthens every row's attention). Of the SWAP_IN_LOOKAHEAD CPU requests
that sat out longest, those whose KV and one more block fit the accelerator pool, with a block of headroom per
accelerator request, move (at most max_swaps per step; never one whose peak KV exceeds that pool).

A policy with a swap_in_occupancy moves them whenever the pool stays at or under that share of its blocks (NEO's
rule), as many as fit."""

import math
from collections.abc import Sequence
from itertools import islice

from apex_serve.types import Placement
from scheduler_service.cpu_placement import CpuPlacement
from scheduler_service.cpu_queue import fitting
from scheduler_service.kv_manager import KVManager
from scheduler_service.prefill import Prefilling
from scheduler_service.request import Request

SWAP_IN_LOOKAHEAD = 8  # the CPU requests, least recently decoded first, a swap-in chooses from


def swap_in_choice(cpu_queue: Sequence[Request], gpu_running: Sequence[Request], prefilling: Prefilling, kv: KVManager,
                   cpu: CpuPlacement, head_sat_out: bool, waiting: bool, paged: bool, occupancy: float | None,
                   max_swaps: int) -> list[Request]:
    """The CPU requests of cpu_queue (least recently decoded first; its head sat out: head_sat_out) that move to the
    accelerator, beside gpu_running and the requests prefilling there, by the module docstring's rule (occupancy: the
    policy's swap_in_occupancy, None for the Scheduler's own; waiting: some request waits)."""
    free = kv.num_free(Placement.GPU)
    longest = math.inf  # the longest context that may move
    if occupancy is None:
        if not free or (waiting and not head_sat_out):
            return []
        if not (head_sat_out or paged):
            longest = max((r.num_tokens for r in gpu_running), default=math.inf)
        # room for its KV and one more block, with a block of headroom for every accelerator request
        room, headroom = free - len(gpu_running) - len(prefilling.on(Placement.GPU)), 1
    else:
        total = kv.num_total(Placement.GPU)
        room, headroom = round(total * occupancy) - (total - free), 0
    movable = (r for r in islice(cpu_queue, SWAP_IN_LOOKAHEAD) if not cpu.must_take(r) and r.num_tokens <= longest)
    return fitting(movable, lambda r: kv.blocks_for(r.num_tokens) + headroom, room, max_swaps)
