"""Chunked prefill under the step's token budget (vLLM v1 semantics): the requests whose prefill runs over several
steps, and the chunk each step computes of them.

A request is admitted with the blocks of all its known tokens, so its prefill never grows and never waits for a block.
Until a plan schedules its prefill to the end of its tokens it is on neither pool's running list but here, FCFS: no
eviction, swap or preemption for growth picks it, and no policy counts it among the decode rows. Each step gives it
min(tokens left, budget left); the step whose chunk reaches the end of its tokens samples its first token, and it
decodes from the next step as a request prefilled whole does.

The first chunk goes in the plan as NewRequestData (num_scheduled_tokens 0 when it is the whole prompt), the next ones
as CachedRequestData(num_scheduled_tokens = the chunk). A chunk's attention always runs on the accelerator, over the
KV of the tokens before it and, causally, over its own. For a CPU-placed request that earlier KV lives in the CPU pool
and is brought back to the accelerator for the chunk (the cost model prices it as prefill_loaded_tokens): the chunk's
attention is compute-bound, chunk x context multiply-adds per head, far too slow for the host's cores, while bringing
the context's KV over the host link costs only context x kv_bytes_per_token per layer."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from apex_serve.types import CachedRequestData, NewRequestData, Placement
from scheduler_service.request import Request


@dataclass(frozen=True, slots=True)
class Chunk:
    """The tokens of one request's prefill one step computes: `tokens` of them after the `context` computed before."""

    request: Request
    context: int
    tokens: int

    @property
    def last(self) -> bool:
        """Whether it reaches the end of the request's tokens: the step samples the request's next token."""
        return self.context + self.tokens >= self.request.num_tokens

    def new_data(self) -> NewRequestData:
        """A first chunk's plan entry: the request in full, naming the chunk unless it is the whole prompt."""
        return self.request.new_data(0 if self.last else self.tokens)

    def delta(self) -> CachedRequestData:
        """A later chunk's plan entry: the chunk alone."""
        return CachedRequestData(self.request.request_id, (), 0, self.tokens)

    @property
    def loaded_tokens(self) -> int:
        """Context tokens brought from the CPU pool to the accelerator for its attention."""
        return self.context if self.request.placement is Placement.CPU else 0


@dataclass(frozen=True)
class ChunkShape:
    """A step's chunks as the policies and the cost model see them (Candidates' prefill fields)."""

    lens: list[int]  # tokens each chunk computes
    contexts: tuple[int, ...]  # tokens computed before each chunk; () when all are whole prompts' first chunks
    loaded_tokens: int  # context tokens of the CPU-placed chunks

    @classmethod
    def of(cls, chunks: Sequence[Chunk]) -> "ChunkShape":
        if not chunks:  # most steps: decodes only
            return cls([], (), 0)
        contexts = tuple(c.context for c in chunks)
        return cls([c.tokens for c in chunks], contexts if any(contexts) else (),
                   sum(c.loaded_tokens for c in chunks))


class Prefilling:
    """The admitted requests whose prefill no plan has yet scheduled to its end, in order of admission."""

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def on(self, placement: Placement) -> list[Request]:
        """Those whose KV lives in the pool of `placement`."""
        return [r for r in self._requests if r.placement is placement]

    def start(self, request: Request, budget: int) -> Chunk:
        """An admitted request's first chunk, at most `budget` tokens; it stays here while tokens are left. Its
        prefill starts from its first token: prompt logprobs of an earlier, abandoned prefill are forgotten."""
        request.prefilling = True
        request.num_computed_tokens = 0
        request.prompt_logprobs.clear()
        self._requests.append(request)
        return self._chunk(request, budget)

    def continuing(self, budget: int) -> list[Chunk]:
        """The next chunk of each request here, FCFS, while the budget lasts."""
        chunks = []
        for request in self._requests[:]:
            if budget <= 0:
                break
            chunk = self._chunk(request, budget)
            budget -= chunk.tokens
            chunks.append(chunk)
        return chunks

    def remove(self, request: Request) -> None:
        """Drop a request still prefilling (aborted or requeued): its computed tokens are forgotten."""
        self._requests.remove(request)
        request.prefilling = False
        request.num_computed_tokens = 0

    def _chunk(self, request: Request, budget: int) -> Chunk:
        context = request.num_computed_tokens
        tokens = min(request.num_tokens - context, budget)
        request.num_computed_tokens = context + tokens
        if request.num_computed_tokens >= request.num_tokens:
            self._requests.remove(request)
            request.prefilling = False
        return Chunk(request, context, tokens)
