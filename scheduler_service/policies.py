"""The three policies (DESIGN §1): per iteration, the execution mode and the CPU decode rows that run.

Every policy runs all prefills and all accelerator-resident decodes the Scheduler admitted; they differ in what they
do with the CPU-resident requests (the candidates, least recently run first):
    gpu-only  never has any (it places nothing on the CPU): always GPU_ONLY.
    neo       NEO's load-aware asymmetric pipelining: sub-batch 0 holds the prefills and the accelerator rows, CPU rows
              fill sub-batch 1 while their attention hides under sub-batch 0's device work, then sub-batch 0 while its
              CPU rows hide under sub-batch 1's; ASYM_PIPELINE only where its predicted tokens/s beats GPU_ONLY.
    apex      predicts the tokens/s of GPU_ONLY, ASYNC_OVERLAP (CPU rows sized to the overlap window, and all it can
              stage) and ASYM_PIPELINE (NEO's construction, considered only where APEX eq. 6 says pipelining can beat
              GPU_ONLY) and takes the best; with a TPOT target, the best of those predicted to stay under it.
Candidates that sat out max_sit_out iterations are forced in (no policy starves a request): GPU_ONLY is then out.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from apex_serve.types import ExecutionMode, OverlapLayout
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ComposedCostModel, compose, pipelining_beats_gpu_only
from scheduler_service.cost.shape import IterationShape, SubBatchShape

MAX_EXPOSED_SHARE = 0.25  # apex admits a CPU row only into options that wait for the CPU at most this share of a step


@dataclass(frozen=True)
class LatencyObjective:
    """The stack's latency objectives in ms (0: none), as --tpot-slo-ms and --ttft-slo-ms set them."""

    tpot_ms: float = 0.0
    ttft_ms: float = 0.0

    @classmethod
    def of(cls, config: SchedulerConfig) -> "LatencyObjective":
        return cls(config.tpot_slo_ms, config.ttft_slo_ms)


@dataclass
class Candidates:
    """What one iteration may run, as the Scheduler hands it to the policy."""

    prefill_lens: list[int]
    gpu_rows: int
    gpu_longest: int  # the longest accelerator row's context (the current token included)
    cpu_context: list[int]  # prefix sums: cpu_context[k] = context tokens of the first k CPU candidates
    forced: int  # the first `forced` CPU candidates must run
    max_cpu_rows: int  # CPU rows one sub-batch can stage
    prefill_contexts: tuple[int, ...] = ()  # per prefill: tokens computed before its chunk; (): all whole prompts
    prefill_loaded_tokens: int = 0  # context tokens of CPU-placed chunks, brought from the CPU pool

    @property
    def num_cpu(self) -> int:
        return len(self.cpu_context) - 1


@dataclass(frozen=True, slots=True)
class Choice:
    """The mode; the first cpu_rows candidates decode, the first cpu_rows_in_sub_batch_1 of them in sub-batch 1
    (ASYM_PIPELINE; the rest in sub-batch 0). estimate_ns ranks the options: one composition at the fitted mean factors
    (the cost model's full corrected prediction of the chosen one is made off the decision path, by
    InFlightStep.prediction)."""

    mode: ExecutionMode
    cpu_rows: int = 0
    cpu_rows_in_sub_batch_1: int = 0
    shape: IterationShape | None = None
    estimate_ns: float = 0.0
    exposed_wait_ns: float = 0.0  # of the estimate: the accelerator waiting for the CPU
    layout: OverlapLayout = OverlapLayout.FUSED  # of the sub-batches with CPU rows


class Policy(Protocol):
    name: str
    uses_cpu: bool

    def choose(self, c: Candidates) -> Choice: ...

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        """Whether more CPU requests (of `contexts` tokens when they decode: the one to place and those queued behind
        it) raise the predicted tokens/s of the decode iterations of `steady` (every running request): CPU rows must
        pay for themselves. Several at once: pipelining pays for its second weight pass only with enough rows."""
        ...

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        """Whether admitting one more request keeps the policy's latency target: `now` is this iteration with its
        prefill, `steady` a decode iteration of every running request with it (all CPU candidates decoding)."""
        ...


def _gpu_part(c: Candidates, cpu_rows: int = 0, cpu_context: int = 0) -> SubBatchShape | None:
    if not (c.prefill_lens or c.gpu_rows or cpu_rows):
        return None
    return SubBatchShape(tuple(c.prefill_lens), c.gpu_rows, c.gpu_rows * c.gpu_longest, cpu_rows, cpu_context,
                         c.prefill_contexts, c.prefill_loaded_tokens)


class _Predicting:
    """Shapes, estimates and predictions shared by the policies (the cost model is optional for gpu-only)."""

    def __init__(self, cost_model: ComposedCostModel | None) -> None:
        self.cost_model = cost_model

    def _estimated(self, mode: ExecutionMode, parts: Sequence[SubBatchShape | None], cpu_rows: int = 0,
                   in_sub_batch_1: int = 0) -> Choice:
        sub_batches = tuple(filter(None, parts))
        if not sub_batches:
            return Choice(ExecutionMode.GPU_ONLY)
        shape = IterationShape(mode, sub_batches)
        m = self.cost_model
        if m is None:
            return Choice(mode, cpu_rows, in_sub_batch_1, shape)
        composed = compose(m.costs, m.model, shape, m.factors)
        residual = m.residual_factor(mode)
        return Choice(mode, cpu_rows, in_sub_batch_1, shape, composed.total_ns * residual,
                      composed.exposed_wait_ns * residual)

    def gpu_only(self, c: Candidates) -> Choice:
        return self._estimated(ExecutionMode.GPU_ONLY, [_gpu_part(c)])

    def async_overlap(self, c: Candidates, k: int) -> Choice:
        return self._estimated(ExecutionMode.ASYNC_OVERLAP, [_gpu_part(c, k, c.cpu_context[k])], k)

    def asym_pipeline(self, c: Candidates, k0: int, k1: int) -> Choice:
        """k1 CPU rows (the first candidates) in sub-batch 1, the next k0 with the accelerator's work in sub-batch 0."""
        ctx = c.cpu_context
        b = SubBatchShape((), 0, 0, k1, ctx[k1]) if k1 else None
        a = _gpu_part(c, k0, ctx[k1 + k0] - ctx[k1])
        if a is None or b is None:
            return self.async_overlap(c, k0 + k1)
        return self._estimated(ExecutionMode.ASYM_PIPELINE, [a, b], k0 + k1, k1)


def _device_attention(m: ComposedCostModel, c: Candidates) -> float:
    """The accelerator's attention of one layer: the prefills' and the accelerator rows', at the fitted factor."""
    costs = m.costs
    gatt = costs.t_gatt(c.gpu_rows, c.gpu_rows * c.gpu_longest) if c.gpu_rows else 0.0
    contexts = c.prefill_contexts or (0,) * len(c.prefill_lens)
    pref = sum(costs.t_pref(n, p) for n, p in zip(c.prefill_lens, contexts))
    return m.factors.device_attention * (pref + gatt)


def _with_rows(c: Candidates, contexts: Sequence[int]) -> Candidates:
    """c with more CPU candidates of these contexts at the back."""
    context = list(c.cpu_context)
    for n in contexts:
        context.append(context[-1] + n)
    return Candidates(c.prefill_lens, c.gpu_rows, c.gpu_longest, context, c.forced, c.max_cpu_rows,
                      c.prefill_contexts, c.prefill_loaded_tokens)


def tokens_per_s(choice: Choice) -> float:
    """Tokens the iteration yields (one per request in it) per estimated second."""
    if choice.shape is None or choice.estimate_ns <= 0:
        return 0.0
    return choice.shape.num_requests / choice.estimate_ns * 1e9


class GpuOnlyPolicy(_Predicting):
    name = "gpu-only"
    uses_cpu = False

    def choose(self, c: Candidates) -> Choice:
        return self.gpu_only(c)

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        return False

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        return True


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest k in [low, high] with fits(k), fits assumed monotone (true then false); low if none."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


class NeoPolicy(_Predicting):
    name = "neo"
    uses_cpu = True

    def __init__(self, cost_model: ComposedCostModel) -> None:
        super().__init__(cost_model)
        self.model = cost_model

    def pipeline_rows(self, c: Candidates) -> tuple[int, int]:
        """NEO's greedy fill: (k0, k1) CPU rows of sub-batches 0 and 1, each hidden under the other's device work;
        without accelerator work, the candidates split evenly (each sub-batch's linear work hides the other's)."""
        m = self.model
        f = m.factors
        costs = m.costs
        limit = min(c.num_cpu, c.max_cpu_rows)
        if not (c.prefill_lens or c.gpu_rows):
            k = min(c.num_cpu, 2 * c.max_cpu_rows)
            return k // 2, k - k // 2
        sync = costs.t_sync(0)
        tokens = sum(c.prefill_lens) + c.gpu_rows
        dev0 = f.linear * costs.t_lin(tokens) + _device_attention(m, c)
        ctx = c.cpu_context

        def catt(start: int, k: int) -> float:
            return f.cpu_attention * costs.t_catt(k, ctx[start + k] - ctx[start]) + sync if k else 0.0

        k1 = _largest(lambda k: catt(0, k) <= dev0, 0, limit)
        k1 = max(k1, min(c.forced, limit))
        if k1 == 0:
            return 0, 0
        dev1 = f.linear * costs.t_lin(k1) + f.staging * costs.t_xfer(k1 * m.model.bytes_per_cpu_row)
        limit0 = min(c.num_cpu - k1, c.max_cpu_rows)
        k0 = _largest(lambda k: catt(k1, k) <= dev1, 0, limit0)
        return max(k0, min(c.forced - k1, limit0)), k1

    def pipeline(self, c: Candidates) -> Choice | None:
        k0, k1 = self.pipeline_rows(c)
        return self.asym_pipeline(c, k0, k1) if k0 + k1 else None

    def best(self, c: Candidates) -> Choice:
        """The chosen option, estimated only."""
        piped = self.pipeline(c) if c.num_cpu else None
        if piped is None:
            return self.gpu_only(c)
        if c.forced:
            return piped
        plain = self.gpu_only(c)
        return piped if tokens_per_s(piped) > tokens_per_s(plain) else plain

    def choose(self, c: Candidates) -> Choice:
        return self.best(c)

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        return tokens_per_s(self.best(_with_rows(steady, contexts))) > tokens_per_s(self.best(steady))

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        return True


class ApexPolicy(NeoPolicy):
    name = "apex"

    def __init__(self, cost_model: ComposedCostModel, objective: LatencyObjective = LatencyObjective()) -> None:
        super().__init__(cost_model)
        self.objective = objective
        self.target_ns = objective.tpot_ms * 1e6

    def window_rows(self, c: Candidates, limit: int) -> int:
        """The most CPU rows whose attention and doorbell fit the ASYNC_OVERLAP overlap window (cost_model docstring):
        the prefills' and accelerator rows' attention and the linear work that does not wait for the CPU rows."""
        m = self.model
        f, costs, qkv = m.factors, m.costs, m.model.qkv_fraction
        prefill = sum(c.prefill_lens)
        fixed = _device_attention(m, c)
        sync = costs.t_sync(0)

        def fits(k: int) -> bool:
            tokens = prefill + c.gpu_rows + k
            lin = f.linear * costs.t_lin(tokens)
            window = fixed + lin * (qkv * (tokens - k) + (1.0 - qkv) * prefill) / tokens
            return f.cpu_attention * costs.t_catt(k, c.cpu_context[k]) + sync <= window

        return _largest(fits, 0, limit)

    def _gate(self, c: Candidates, limit: int) -> bool:
        """APEX eq. 6 on this batch: can asymmetric pipelining beat GPU_ONLY at all?"""
        if not c.gpu_rows or not limit:
            return True
        costs = self.model.costs
        gpu_kv = c.gpu_rows * c.gpu_longest
        t_lin = costs.t_lin(sum(c.prefill_lens) + c.gpu_rows + limit)
        t_gatt = costs.t_gatt(c.gpu_rows, gpu_kv)
        t_catt = costs.t_catt(limit, c.cpu_context[limit])
        if min(t_lin, t_gatt, t_catt) <= 0:
            return True
        return pipelining_beats_gpu_only(t_lin, t_gatt, gpu_kv / t_gatt, c.cpu_context[limit] / t_catt)

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        """NeoPolicy's test over apex's options, less those that wait for the CPU more than MAX_EXPOSED_SHARE of the
        step: rows that only pay while exposed would, once their context grows or the rows they must run (max_sit_out)
        pile up, slow every iteration they run in."""
        more = _with_rows(steady, contexts)
        return tokens_per_s(self.best(more, MAX_EXPOSED_SHARE)) > tokens_per_s(self.best(steady, MAX_EXPOSED_SHARE))

    def best(self, c: Candidates, max_exposed_share: float = 1.0) -> Choice:
        options: list[Choice] = []
        if not c.forced:
            options.append(self.gpu_only(c))
        limit = min(c.num_cpu, c.max_cpu_rows)
        if limit:
            low = max(1, min(c.forced, limit))
            sized = max(low, self.window_rows(c, limit))
            options += [self.async_overlap(c, k) for k in sorted({sized, limit})]
            if not self._within_target(options[-1]):
                k = _largest(lambda k: self._within_target(self.async_overlap(c, k)), low, limit)
                options.append(self.async_overlap(c, k))
            if self._gate(c, limit):
                piped = self.pipeline(c)
                if piped is not None:
                    options.append(piped)
        options = [o for o in options if o.shape is not None and o.exposed_wait_ns <= max_exposed_share * o.estimate_ns
                   ] or [Choice(ExecutionMode.GPU_ONLY)]
        within = [o for o in options if self._within_target(o)]
        if within:
            return max(within, key=tokens_per_s)
        return min(options, key=lambda o: o.estimate_ns)

    def _within_target(self, choice: Choice) -> bool:
        return not self.target_ns or choice.estimate_ns <= self.target_ns

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        """With a TPOT target, a request is admitted only while this iteration (GPU rows and prefills) and the decode
        iterations after it (every running request a row, CPU rows as many as one iteration stages) are predicted
        under the target: rows that sit out or a batch that outgrows the target would both break it."""
        if not self.target_ns:
            return True
        if steady.num_cpu > steady.max_cpu_rows:
            return False
        limit = steady.num_cpu
        steady_choice = self.async_overlap(steady, limit) if limit else self.gpu_only(steady)
        return self._within_target(self.gpu_only(now)) and self._within_target(steady_choice)


def make_policy(name: str, cost_model: ComposedCostModel | None,
                objective: LatencyObjective = LatencyObjective()) -> Policy:
    if name == "gpu-only":
        return GpuOnlyPolicy(cost_model)
    if cost_model is None:
        raise ValueError(f"policy: {name!r} needs a cost model (the profiler's tables); run a profile first")
    if name == "neo":
        return NeoPolicy(cost_model)
    if name == "apex":
        return ApexPolicy(cost_model, objective)
    raise ValueError(f"policy: unknown {name!r}")
