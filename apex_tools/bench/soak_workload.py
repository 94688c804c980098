"""The soak benchmark's requests (apex_tools.bench.soak): what each one asks for, drawn from a seeded generator, and
which of completed, cancelled, failed or lost it ended as."""

import random
import string
from dataclasses import dataclass

import grpc

from apex_serve.types import SamplingParams
from apex_tools.bench.faults import StreamRecord

NAMED_FAILURES = frozenset(c.name for c in grpc.StatusCode) - {"OK", "UNKNOWN", "DEADLINE_EXCEEDED"}


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int
    cancel_after: int  # tokens after which the client cancels; 0: never

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)


class Workload:
    """The requests, drawn from a seeded generator: a random prompt of prompt_bytes (low, high) bytes, a max_tokens
    in output_tokens (low, high), and a cancel_fraction of them cancelled after a random number of tokens."""

    def __init__(self, prompt_bytes: tuple[int, int], output_tokens: tuple[int, int], seed: int,
                 cancel_fraction: float) -> None:
        self._prompt_bytes = prompt_bytes
        self._output_tokens = output_tokens
        self._rng = random.Random(seed)
        self._cancel_fraction = cancel_fraction

    def next(self) -> Request:
        rng = self._rng
        prompt = "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(*self._prompt_bytes)))
        max_tokens = rng.randint(*self._output_tokens)
        cancel = rng.random() < self._cancel_fraction
        return Request(prompt, max_tokens, rng.randint(1, max_tokens - 1) if cancel else 0)


def outcome(request: Request, record: StreamRecord | None) -> tuple[str, str]:
    """(completed | cancelled | failed | lost, the error or the reason it was lost) of a request whose stream ended
    as record says (None: it was still running at the end)."""
    if record is None:
        return "lost", "running at the end"
    if record.cancelled:
        return "cancelled", ""
    if record.error_code in NAMED_FAILURES:
        return "failed", f"{record.error_code}/{record.error_kind}" if record.error_kind else record.error_code
    if record.error_code:
        return "lost", "hung past its deadline" if record.error_code == "DEADLINE_EXCEEDED" else record.error_code
    if not record.completed:
        return "lost", "ended without its final message"
    if not record.completion_tokens == len(record.token_ids) == request.max_tokens:
        return "lost", "fewer tokens than max_tokens"
    return "completed", ""
