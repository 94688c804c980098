"""What a policy decides over (scheduler_service.policies): the candidates of one iteration as the Scheduler hands them
over, the choice a policy makes of them, the Policy protocol the Scheduler and the CPU placement call, and the two
scores the policies rank options by."""

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

from apex_serve.types import ExecutionMode, OverlapLayout
from scheduler_service.cost.model import ComposedCostModel, Prediction
from scheduler_service.cost.shape import IterationShape, SubBatchShape


@dataclass
class Candidates:
    """What one iteration may run, as the Scheduler hands it to the policy."""

    prefill_lens: list[int]
    gpu_rows: int
    gpu_kv_tokens: int  # KV tokens the accelerator rows' decode attention reads (device_kv_tokens)
    cpu_context: list[int]  # prefix sums: cpu_context[k] = context tokens of the first k CPU candidates
    forced: int  # the first `forced` CPU candidates must run
    max_cpu_rows: int  # CPU rows one sub-batch can stage
    prefill_contexts: tuple[int, ...] = ()  # per prefill: tokens computed before its chunk; (): all whole prompts
    prefill_loaded_tokens: int = 0  # context tokens of CPU-placed chunks, brought from the CPU pool
    cpu_sat_out: tuple[int, ...] = ()  # per CPU candidate: iterations since its last token (the TPOT rule's); (): 0
    first_token_waits: tuple[tuple[float, int], ...] = ()  # per request without its first token: (ns waited so far,
    #   iterations until its first token at the earliest, this one included)
    _gpu_parts: dict[int, SubBatchShape | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_cpu(self) -> int:
        return len(self.cpu_context) - 1

    def gpu_part(self, k: int = 0) -> SubBatchShape | None:
        """The sub-batch of the prefills and the accelerator rows with the first k CPU candidates (None if empty):
        GPU_ONLY's and NEO's sub-batch 0 for k = 0, ASYNC_OVERLAP's with k rows. Built once per k: a decision prices
        each under several options and probes."""
        parts = self._gpu_parts
        if k not in parts:
            parts[k] = gpu_sub_batch(self, k, self.cpu_context[k])
        return parts[k]


class Choice(NamedTuple):
    """The mode; the first cpu_rows candidates decode, the first cpu_rows_in_sub_batch_1 of them in sub-batch 1
    (ASYM_PIPELINE; the rest in sub-batch 0). estimate_ns ranks the options: without a latency objective, one
    composition at the fitted mean factors (the cost model's full corrected prediction of the chosen one is made off
    the decision path, by InFlightStep.prediction); with one, that full prediction itself, so the objective holds for
    the predicted_ns the iteration's record carries. A named tuple: a decision builds one per option it weighs."""

    mode: ExecutionMode
    cpu_rows: int = 0
    cpu_rows_in_sub_batch_1: int = 0
    shape: IterationShape | None = None
    estimate_ns: float = 0.0
    exposed_wait_ns: float = 0.0  # of the estimate: the accelerator waiting for the CPU
    layout: OverlapLayout = OverlapLayout.FUSED  # of the sub-batches with CPU rows
    prediction: Prediction | None = None  # with an objective: the full prediction the estimate is (None without)


class Policy(Protocol):
    name: str
    uses_cpu: bool
    cost_model: ComposedCostModel | None  # what it predicts with (None: gpu-only without a profile)
    # swap CPU requests in while the accelerator pool stays at or under this share of its blocks (NEO's rule); None:
    # the Scheduler's own (only while they sit out and nothing waits, with headroom for every accelerator request)
    swap_in_occupancy: float | None

    def choose(self, c: Candidates) -> Choice: ...

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        """Whether more CPU requests (of `contexts` tokens when they decode: the one to place and those queued behind
        it) raise the predicted tokens/s of the decode iterations of `steady` (every running request): CPU rows must
        pay for themselves. Several at once: pipelining pays for its second weight pass only with enough rows."""
        ...

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        """Whether placing one more request on the CPU pool keeps the policy's TPOT objective: `now` is this iteration
        with its prefill, `steady` a decode iteration of every running request with it (all CPU candidates
        decoding)."""
        ...

    def chunk_tokens(self, decode: Candidates, budget: int) -> int:
        """The prefill tokens a step gives long prompts while requests wait (the chunks of prompts longer than it, and
        of the requests still prefilling, together), of the `budget` its decode rows leave, beside the decode work of
        `decode` (its accelerator rows and CPU candidates, no prefill): the budget, or fewer where the policy spreads
        long prompts over more steps so that each carries decode rows."""
        ...


def gpu_sub_batch(c: Candidates, cpu_rows: int = 0, cpu_context: int = 0) -> SubBatchShape | None:
    """The sub-batch of c's prefills and accelerator rows with cpu_rows CPU rows of cpu_context tokens."""
    if not (c.prefill_lens or c.gpu_rows or cpu_rows):
        return None
    return SubBatchShape(tuple(c.prefill_lens), c.gpu_rows, c.gpu_kv_tokens, cpu_rows, cpu_context,
                         c.prefill_contexts, c.prefill_loaded_tokens)


@dataclass(frozen=True)
class DeviceRows:
    """Accelerator decode rows as their attention reads them: how many, their contexts (the current token included)
    summed, and the longest."""

    rows: int = 0
    total: int = 0
    longest: int = 0

    @classmethod
    def of(cls, contexts: Collection[int]) -> "DeviceRows":
        return cls(len(contexts), sum(contexts), max(contexts, default=0))

    def add(self, context: int) -> "DeviceRows":
        """With one more row of this context."""
        return DeviceRows(self.rows + 1, self.total + context, max(self.longest, context))

    def kv_tokens(self, paged: bool) -> int:
        """KV tokens the decode attention reads: each row's own where the kernel is paged (FlashInfer), as many times
        the longest as there are rows where it pads them (SDPA's gathered batch; gpu_worker.decode_kernels)."""
        return self.total if paged else self.rows * self.longest


def device_kv_tokens(contexts: Collection[int], paged: bool) -> int:
    """KV tokens the accelerator's decode attention reads for rows of these contexts (DeviceRows.kv_tokens)."""
    return DeviceRows.of(contexts).kv_tokens(paged)


def with_rows(c: Candidates, contexts: Sequence[int]) -> Candidates:
    """c with more CPU candidates of these contexts at the back (just joined: sat out 0)."""
    context = list(c.cpu_context)
    for n in contexts:
        context.append(context[-1] + n)
    sat_out = (*c.cpu_sat_out, *(0,) * len(contexts)) if c.cpu_sat_out else ()
    return replace(c, cpu_context=context, cpu_sat_out=sat_out)


def tokens_per_s(choice: Choice) -> float:
    """Tokens the iteration yields (one per request in it) per estimated second."""
    if choice.shape is None or choice.estimate_ns <= 0:
        return 0.0
    return choice.shape.num_requests / choice.estimate_ns * 1e9


def idle_aware_tokens_per_s(choice: Choice) -> float:
    """apex's score (scheduler_service.policies' docstring): tokens over the estimated step plus its exposed wait,
    the accelerator's idle time counted once more."""
    if choice.shape is None or choice.estimate_ns <= 0:
        return 0.0
    return choice.shape.num_requests / (choice.estimate_ns + choice.exposed_wait_ns) * 1e9
