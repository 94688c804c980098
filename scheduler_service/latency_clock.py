"""The scheduler's predicted clock: the predicted steps it has planned, summed. By it, how long each request not yet
given its first token has waited, and how many iterations it needs at least until that token: what the TTFT rule of
scheduler_service.objectives weighs. Predicted, not measured, so the simulator's virtual time and the real stack
read it alike."""

import math
from collections.abc import Iterable, Sequence
from itertools import islice

from scheduler_service.prefill import Chunk
from scheduler_service.request import Request

WAITING_LOOKAHEAD = 4  # waiting requests weighed, from the front (FCFS: the longest waits)


class PredictedClock:
    def __init__(self) -> None:
        self.now_ns = 0.0
        self._arrived: dict[str, float] = {}  # by request id, until it finishes

    def arrive(self, request_id: str) -> None:
        self._arrived[request_id] = self.now_ns

    def forget(self, request_id: str) -> None:
        self._arrived.pop(request_id, None)

    def advance(self, step_ns: float) -> None:
        self.now_ns += step_ns

    def first_token_waits(self, chunks: Sequence[Chunk], waiting: Iterable[Request],
                          chunk_tokens: int) -> tuple[tuple[float, int], ...]:
        """(ns waited, iterations until the first token at the earliest, the planned one included) of each request
        with a prefill chunk in the step being planned and of the first WAITING_LOOKAHEAD waiting ones, at most
        chunk_tokens of its prefill a step (this step's prefill budget); a request that has its first token already
        (resumed after a preemption) is not weighed."""
        waits = []
        for chunk in chunks:
            request = chunk.request
            if not request.num_output_tokens:
                left = request.num_tokens - chunk.context - chunk.tokens
                waits.append((self._waited(request), 1 + math.ceil(left / chunk_tokens)))
        for request in islice((r for r in waiting if not r.num_output_tokens), WAITING_LOOKAHEAD):
            waits.append((self._waited(request), 1 + math.ceil(request.num_tokens / chunk_tokens)))
        return tuple(waits)

    def _waited(self, request: Request) -> float:
        return self.now_ns - self._arrived.get(request.request_id, self.now_ns)
