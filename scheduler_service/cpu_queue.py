"""Arithmetic over the CPU-resident requests' queue (least recently decoded first): the prefix sums of their decode
contexts the policies price, and how many of them must decode now to keep the sit-out bound."""

from collections.abc import Collection, Iterable
from itertools import accumulate

from scheduler_service.request import Request


def prefix_contexts(requests: Iterable[Request]) -> list[int]:
    """Prefix sums of the requests' decode contexts (a row's context: its KV and its token)."""
    return [0, *accumulate(r.num_tokens for r in requests)]


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
