"""The decode slots of one iteration (steps 2 and 4 of scheduler_service.scheduler's docstring): each decoding
request's plan entry, with a new block where its next token needs one. These loops run for every running request on
every iteration, so each keeps its per-row work to a few attribute reads: a request's unchanged entry is re-used step
to step (Request.entry) and its KV capacity is read from Request.kv_slots."""

from collections.abc import Callable

from apex_serve.types import CachedRequestData, Placement
from scheduler_service.decision import DeviceRows
from scheduler_service.kv_manager import KVManager
from scheduler_service.request import Request, RequestStatus


def grow_gpu_rows(kv: KVManager, rows: list[Request], evict: Callable[[Request], None]
                  ) -> tuple[list[Request], list[CachedRequestData], DeviceRows]:
    """A decode slot for every accelerator request of rows (a list of the caller's, oldest first, taken over) that
    keeps its place: one that needs a block when the pool is empty has evict() make room, taking the youngest first
    (itself when it is the youngest left). The requests that decode, their plan entries (sub-batch 0), and their
    contexts as the accelerator's decode attention reads them."""
    entries: list[CachedRequestData] = []
    add_entry = entries.append
    longest = total = 0
    for request in rows:  # the for statement reads the list's length each time: it stops short of those popped
        tokens = request.num_tokens
        if tokens <= request.kv_slots:  # its next slot is in a block it holds
            entry = request.unchanged_entry  # Request.entry((), 0) inlined
            add_entry(entry if entry is not None and entry.sub_batch == 0 else request.entry((), 0))
        else:
            while kv.num_free(Placement.GPU) == 0:
                if len(rows) > len(entries) + 1:  # a request after this one is left to evict
                    evict(rows.pop())
                else:
                    evict(request)
                    break
            if request.placement is not Placement.GPU or request.status is not RequestStatus.RUNNING:
                rows.pop()  # it evicted itself, the last request left
                break
            add_entry(request.entry(kv.grow(request), 0))
        total += tokens
        if tokens > longest:
            longest = tokens
    return rows, entries, DeviceRows(len(entries), total, longest)


def grow_cpu_rows(kv: KVManager, chosen: list[Request], in_sub_batch_1: int, step: int,
                  entries: list[CachedRequestData], preempt: Callable[[Request], None]) -> list[Request]:
    """The chosen CPU requests' decode slots in step `step` (the first in_sub_batch_1 in sub-batch 1): their plan
    entries are appended to entries, and a request whose slot the CPU pool cannot give is preempted. The requests
    that decode, each marked as decoded in the step."""
    rows = []
    add_row, add_entry = rows.append, entries.append
    for sub_batch, requests in ((1, chosen[:in_sub_batch_1]), (0, chosen[in_sub_batch_1:])):
        for request in requests:
            if request.num_tokens <= request.kv_slots:  # as in grow_gpu_rows
                entry = request.unchanged_entry
                add_entry(entry if entry is not None and entry.sub_batch == sub_batch else request.entry((), sub_batch))
            elif kv.num_free(Placement.CPU) == 0:
                preempt(request)
                continue
            else:
                add_entry(request.entry(kv.grow(request), sub_batch))
            request.last_step = step
            add_row(request)
    return rows
