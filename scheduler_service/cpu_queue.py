"""Arithmetic over the CPU-resident requests' queue (least recently decoded first): the prefix sums of their decode
contexts the policies price, the iterations each has sat out, how many of them must decode now to keep the sit-out
bound, which of them fit a room (the accelerator's free blocks, for swap-ins), and the rotation after a step."""

from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from itertools import accumulate
from operator import attrgetter

from scheduler_service.request import Request

_num_tokens = attrgetter("num_tokens")


def prefix_contexts(requests: Iterable[Request]) -> list[int]:
    """Prefix sums of the requests' decode contexts (a row's context: its KV and its token)."""
    return list(accumulate(map(_num_tokens, requests), initial=0))


def sat_out(requests: Iterable[Request], next_step_id: int) -> tuple[int, ...]:
    """Iterations each request has gone without decoding, up to step next_step_id (one that joined the queue for the
    step being planned: 0)."""
    return tuple(max(0, next_step_id - r.last_step - 1) for r in requests)


def must_run(queue: Collection[Request], capacity: int, max_sit_out: int, next_step_id: int) -> int:
    """How many requests from the front of the queue must decode in step next_step_id so that none sits out more
    than max_sit_out iterations: earliest deadline first, the queue being in deadline order, with at most capacity
    of them per iteration; the i-th (from 0) is due within max_sit_out - sat_out iterations."""
    due = max_sit_out + 1 - next_step_id
    n = len(queue)
    must = 0
    for i, request in enumerate(queue, 1):
        slack = capacity * max(0, due + request.last_step)  # due + last_step: max_sit_out - its sat_out
        if slack >= n - must:  # deadlines only grow along the queue: no later request needs more
            break
        must = max(must, i - slack)
    return min(must, capacity)


def fitting(requests: Iterable[Request], need: Callable[[Request], int], room: int, limit: int) -> list[Request]:
    """Of the requests in order, at most `limit`: each one whose need fits the room the ones before it left."""
    chosen = []
    for request in requests:
        if len(chosen) >= limit:
            break
        n = need(request)
        if n <= room:
            chosen.append(request)
            room -= n
    return chosen


def to_back(queue: deque[Request], decoded: Sequence[Request], chosen: int) -> None:
    """The requests that decoded go to the back of the queue: the chosen were its front (chosen -1: they were not),
    `decoded` all of them unless one left the queue (preempted)."""
    if len(decoded) == chosen:
        queue.rotate(-len(decoded))
        return
    for request in decoded:
        queue.remove(request)
        queue.append(request)
