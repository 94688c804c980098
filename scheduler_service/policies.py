"""The three policies (DESIGN §1): per iteration, the execution mode, the overlap layout and the CPU decode rows that
run.

Every policy runs all prefills and all accelerator-resident decodes the Scheduler admitted; they differ in what they
do with the CPU-resident requests (the candidates, least recently run first):
    gpu-only  never has any (it places nothing on the CPU): always GPU_ONLY; it ignores the latency objectives.
    neo       NEO's load-aware asymmetric pipelining: sub-batch 0 holds the prefills and the accelerator rows, CPU rows
              fill sub-batch 1 while their attention hides under sub-batch 0's device work, then sub-batch 0 while its
              CPU rows hide under sub-batch 1's; ASYM_PIPELINE only where its predicted tokens/s beats GPU_ONLY. NEO
              computes the QKV projection of all rows of a sub-batch at once: the FUSED layout.
    apex      predicts GPU_ONLY, ASYNC_OVERLAP (CPU rows sized to the overlap window, and all it can stage) and
              ASYM_PIPELINE (NEO's construction, priced even where APEX eq. 6 says it cannot beat GPU_ONLY: beside
              ASYNC_OVERLAP with many CPU rows it may still win),
              ASYNC_OVERLAP under both layouts (FUSED, SPLIT: compose prices each as executed, and the window follows
              the layout; ASYM_PIPELINE in PIPELINE_LAYOUT), and takes the best by the idle-aware score
              (ApexPolicy.best).
Latency objectives (scheduler_service.objectives) bind neo and apex: an option that breaks the TPOT or the TTFT rule is
not taken while one that keeps them exists (_Predicting._decide says what is given up first where none does).
Candidates that sat out max_sit_out iterations, or whose TPOT would break by sitting out once more, are forced in (no
policy starves a request): GPU_ONLY is then out.

apex's idle-aware score. CPU attention that outlasts the overlap window (the overflow) leaves the accelerator idle:
the composed step carries it as the exposed wait. Per-iteration tokens/s weighs that idle time once, like work, and so
prefers a step whose overflow rows stick far out of the window whenever their tokens edge out the alternatives (on a
T4 with 1 accelerator row and 24 CPU rows: the accelerator idle 90% of the step, a hair ahead of pipelining). In the
steady state the overflow rows are not lost when they do not run now: they sit out and are decoded
later within a window (or, once they sit out, swapped in to an accelerator with room), at no idle time. So each
option scores its tokens over its predicted step plus its exposed wait (the idle time counted once more, as the
window time the deferred rows would have used), and the overflow goes where it costs least: into ASYM_PIPELINE (its
second weight pass is work, not idle time), to a later iteration (the window-sized option: fewer CPU rows now), or
exposed only where even so scored it still wins.

With no objective set, apex bounds the step (MAX_IDLE_SHARE): an option with CPU rows may be slower than GPU_ONLY's
step for the same accelerator rows and prefills by the accelerator work of its CPU rows (their share of the linear
passes, a SPLIT layout's second pass, their staging) plus an exposed wait of at most MAX_IDLE_SHARE of GPU_ONLY's step,
i.e. exposed_wait <= MAX_IDLE_SHARE x GPU_ONLY's step; without accelerator rows or prefills there is nothing to slow.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from apex_serve.types import ExecutionMode, OverlapLayout
from scheduler_service.cost.model import ComposedCostModel
from scheduler_service.cost.shape import IterationShape, SubBatchShape
from scheduler_service.decision import (
    Candidates,
    Choice,
    Policy,
    gpu_sub_batch,
    idle_aware_tokens_per_s,
    tokens_per_s,
    with_rows,
)
from scheduler_service.objectives import NO_OBJECTIVE, LatencyObjective
from scheduler_service.row_search import largest_fitting

__all__ = ["MAX_IDLE_SHARE", "ApexPolicy", "GpuOnlyPolicy", "LatencyObjective", "NeoPolicy", "make_policy"]

MAX_IDLE_SHARE = 0.25  # no objective: apex's exposed wait at most this share of GPU_ONLY's step for the same rows
# ASYM_PIPELINE runs FUSED only: SPLIT's second QKV pass lengthens a sub-batch's device work by x and hides at most x
# more of the other sub-batch's CPU attention, so priced as executed it never beats FUSED (nor did it measured here).
PIPELINE_LAYOUT = OverlapLayout.FUSED
_LAYOUTS = tuple(OverlapLayout)  # iterating the Enum class runs Python code each time
# prefill chunks whose steps' difference prices a token of a compute-bound chunk (apex's ridge, chunk_tokens)
COMPUTE_BOUND_CHUNKS = (2048, 4096)


class _Predicting:
    """Shapes, estimates and predictions shared by the policies (the cost model is optional for gpu-only), and the
    objectives' test of an option."""

    swap_in_occupancy: float | None = None  # the Scheduler's own swap-in rule

    def __init__(self, cost_model: ComposedCostModel | None, objective: LatencyObjective = NO_OBJECTIVE) -> None:
        self.cost_model = cost_model
        self.objective = objective

    def _estimated(self, mode: ExecutionMode, parts: Sequence[SubBatchShape | None], cpu_rows: int = 0,
                   in_sub_batch_1: int = 0, layout: OverlapLayout = OverlapLayout.FUSED) -> Choice:
        sub_batches = tuple(filter(None, parts))
        if not sub_batches:
            return Choice(ExecutionMode.GPU_ONLY)
        shape = IterationShape(mode, sub_batches, layout)
        m = self.cost_model
        if m is None:
            return Choice(mode, cpu_rows, in_sub_batch_1, shape, layout=layout)
        if self.objective.any:  # the objectives hold for the prediction the iteration's record carries
            predicted = m.predict(shape)
            return Choice(mode, cpu_rows, in_sub_batch_1, shape, predicted.total_ns, predicted.exposed_wait_ns, layout,
                          predicted)
        composed = m.composed(shape)
        residual = m.residual_factor(mode, shape.run_layout)
        return Choice(mode, cpu_rows, in_sub_batch_1, shape, composed.total_ns * residual,
                      composed.exposed_wait_ns * residual, layout)

    def gpu_only(self, c: Candidates) -> Choice:
        return self._estimated(ExecutionMode.GPU_ONLY, [c.gpu_part()])

    def async_overlap(self, c: Candidates, k: int, layout: OverlapLayout = OverlapLayout.FUSED) -> Choice:
        return self._estimated(ExecutionMode.ASYNC_OVERLAP, [c.gpu_part(k)], k, 0, layout)

    def asym_pipeline(self, c: Candidates, k0: int, k1: int, layout: OverlapLayout = OverlapLayout.FUSED) -> Choice:
        """k1 CPU rows (the first candidates) in sub-batch 1, the next k0 with the accelerator's work in sub-batch 0."""
        ctx = c.cpu_context
        b = SubBatchShape((), 0, 0, k1, ctx[k1]) if k1 else None
        a = gpu_sub_batch(c, k0, ctx[k1 + k0] - ctx[k1]) if k0 else c.gpu_part()
        if a is None or b is None:
            return self.async_overlap(c, k0 + k1, layout)
        return self._estimated(ExecutionMode.ASYM_PIPELINE, [a, b], k0 + k1, k1, layout)

    def _with_due(self, c: Candidates, shortest_ns: float) -> Candidates:
        """c with the candidates the TPOT objective makes due at the shortest step forced in (they are due at any)."""
        due = self.objective.due(c.cpu_sat_out, shortest_ns)
        return replace(c, forced=due) if due > c.forced else c

    def _keeps(self, o: Choice, c: Candidates, shortest_ns: float, sit_out: bool = True) -> bool:
        """Whether option o keeps the latency objectives (scheduler_service.objectives; the sit-out rule only with
        sit_out), shortest_ns being GPU_ONLY's step for the same accelerator rows and prefills."""
        objective = self.objective
        tpot = objective.keeps_tpot(o.estimate_ns, o.cpu_rows, c.cpu_sat_out if sit_out else ())
        return tpot and objective.keeps_ttft(o.estimate_ns, shortest_ns, c.first_token_waits)

    def _decide(self, c: Candidates, options_of: Callable[[Candidates, Choice], list[Choice]],
                score: Callable[[Choice], float], allowed: Callable[[Choice, Choice], bool] = lambda o, plain: True
                ) -> Choice:
        """The best-scored option that keeps the objectives and `allowed` (of it and GPU_ONLY's option). Where none
        keeps the objectives with the candidates the TPOT rule makes due forced in, those wait (the step bounds every
        running request's interval, a sit-out one CPU request's; max_sit_out still binds); where none keeps them even
        so, GPU_ONLY, or with rows forced by max_sit_out (or no accelerator work) the shortest step. Of those that
        keep them, where none is allowed (forced rows), the one of the least exposed wait. GPU_ONLY's option is built
        once and handed to options_of: forcing candidates in does not change it."""
        plain = self.gpu_only(c)
        due = self._with_due(c, plain.estimate_ns)
        options = [o for o in options_of(due, plain) if o.shape is not None]
        if not options:
            return plain
        # with no objective set, every option keeps them
        kept = [o for o in options if self._keeps(o, due, plain.estimate_ns)] if self.objective.any else options
        if not kept and due is not c:
            options = [o for o in options_of(c, plain) if o.shape is not None]
            kept = [o for o in options if self._keeps(o, c, plain.estimate_ns, False)]
        if not kept:  # GPU_ONLY unless rows are forced (or it has no work): CPU rows cannot keep the objective
            return plain if c.forced == 0 and plain.shape is not None else min(options, key=lambda o: o.estimate_ns)
        permitted = [o for o in kept if allowed(o, plain)]
        return max(permitted, key=score) if permitted else min(kept, key=lambda o: o.exposed_wait_ns)

    def chunk_tokens(self, decode: Candidates, budget: int) -> int:
        """The whole budget: only apex spreads prompts (ApexPolicy.chunk_tokens)."""
        return budget

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        """Whether placing one more request on the CPU pool keeps the TPOT objective (always, without one): some option
        of `steady`, a decode iteration of every running request with it, must keep the steady rule of
        scheduler_service.objectives. `now`, the iteration of its prefill, does not count: a prefill step is the
        accelerator's as under gpu-only (whose admissions no objective holds back)."""
        return self._steady_keeps(steady)

    def _steady_keeps(self, steady: Candidates) -> bool:
        """Whether some option of the steady iteration keeps the steady TPOT rule (always, without an objective or CPU
        requests)."""
        if not (self.objective.tpot_ms and steady.num_cpu):
            return True
        return any(self.objective.keeps_steady_tpot(o.estimate_ns, o.cpu_rows, steady.num_cpu)
                   for o in self._steady_options(steady))

    def _steady_options(self, steady: Candidates) -> list[Choice]:
        return [self.gpu_only(steady)]


class GpuOnlyPolicy(_Predicting):
    name = "gpu-only"
    uses_cpu = False

    def __init__(self, cost_model: ComposedCostModel | None) -> None:
        super().__init__(cost_model)  # no objective: gpu-only has no CPU rows or modes to trade for latency

    def choose(self, c: Candidates) -> Choice:
        return self.gpu_only(c)

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        return False

    def admits(self, now: Candidates, steady: Candidates) -> bool:
        return True


class NeoPolicy(_Predicting):
    name = "neo"
    uses_cpu = True
    layout = PIPELINE_LAYOUT  # NEO's sub-batches compute QKV for all their rows at once: FUSED

    def __init__(self, cost_model: ComposedCostModel, objective: LatencyObjective = NO_OBJECTIVE) -> None:
        super().__init__(cost_model, objective)
        self.model = cost_model
        self._fill_hints: list[int | None] = [None, None]  # the sub-batches' fills found last: where a search starts

    def pipeline_rows(self, c: Candidates) -> tuple[int, int]:
        """NEO's greedy fill: (k0, k1) CPU rows of sub-batches 0 and 1, each hidden under the other's device work;
        without accelerator work, the candidates split evenly (each sub-batch's linear work hides the other's). The
        device work is the cost model's price of each sub-batch (ComposedCostModel.priced; sub-batch 0's without the
        staging of its CPU-placed prefills' context), the CPU work of k rows its SubBatchCosts.hidden. Like apex's
        window, each fill moves little from step to step: its search starts from the last one found."""
        m = self.model
        limit = min(c.num_cpu, c.max_cpu_rows)
        gpu = c.gpu_part()
        if gpu is None:
            k = min(c.num_cpu, 2 * c.max_cpu_rows)
            return k // 2, k - k // 2
        accelerator = m.priced(gpu, self.layout)
        dev0 = accelerator.linear + accelerator.attention
        costs, sync, cpu_factor = m.costs, m.costs.t_sync(0), m.factors.cpu_attention
        ctx = c.cpu_context

        def hidden(start: int, k: int) -> float:
            return cpu_factor * costs.t_catt(k, ctx[start + k] - ctx[start]) + sync if k else 0.0

        hints = self._fill_hints
        k1 = hints[1] = largest_fitting(lambda k: hidden(0, k) <= dev0, 0, limit, hints[1])
        k1 = max(k1, min(c.forced, limit))
        if k1 == 0:
            return 0, 0
        dev1 = m.priced(SubBatchShape((), 0, 0, k1, ctx[k1]), self.layout).device
        limit0 = min(c.num_cpu - k1, c.max_cpu_rows)
        k0 = hints[0] = largest_fitting(lambda k: hidden(k1, k) <= dev1, 0, limit0, hints[0])
        return max(k0, min(c.forced - k1, limit0)), k1

    def pipeline(self, c: Candidates) -> Choice | None:
        k0, k1 = self.pipeline_rows(c)
        return self.asym_pipeline(c, k0, k1, self.layout) if k0 + k1 else None

    def _within_step(self, c: Candidates, piped: Choice) -> Choice:
        """The pipeline cut to the most rows (NEO's sub-batch 1 first, at least the forced ones) whose step keeps the
        TPOT objective."""
        k1_full = piped.cpu_rows_in_sub_batch_1
        layout = piped.layout

        def cut(n: int) -> Choice:
            return self.asym_pipeline(c, n - min(k1_full, n), min(k1_full, n), layout)

        n = largest_fitting(lambda n: cut(n).estimate_ns <= self.objective.tpot_ns, max(1, c.forced), piped.cpu_rows)
        return cut(n)

    def best(self, c: Candidates) -> Choice:
        """The chosen option, estimated only: the better of NEO's pipeline and GPU_ONLY by tokens/s, among those that
        keep the objectives (the pipeline cut to keep the TPOT step where it would break it)."""
        return self._decide(c, self._neo_options, tokens_per_s)

    def _neo_options(self, c: Candidates, plain: Choice) -> list[Choice]:
        piped = self.pipeline(c) if c.num_cpu else None
        if piped is None:
            return [plain]
        options = [piped] if c.forced else [piped, plain]
        if self.objective.tpot_ms and piped.estimate_ns > self.objective.tpot_ns:
            options.append(self._within_step(c, piped))
        return options

    def choose(self, c: Candidates) -> Choice:
        return self.best(c)

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        """Whether the rows raise the predicted score of the steady iteration, and some option of it with them keeps
        the steady TPOT rule."""
        more = with_rows(steady, contexts)
        return self._score(self.best(more)) > self._score(self.best(steady)) and self._steady_keeps(more)

    def _score(self, choice: Choice) -> float:
        return tokens_per_s(choice)

    def _steady_options(self, steady: Candidates) -> list[Choice]:
        piped = self.pipeline(steady) if steady.num_cpu else None
        return [self.gpu_only(steady)] + ([piped] if piped is not None else [])


class ApexPolicy(NeoPolicy):
    name = "apex"

    def __init__(self, cost_model: ComposedCostModel, objective: LatencyObjective = NO_OBJECTIVE) -> None:
        super().__init__(cost_model, objective)
        self._window_hints: dict[OverlapLayout, int] = {}  # per layout, the window found last: where a search starts
        # (steps the cost model observed, ns a prefill token adds to a compute-bound step): chunk_tokens'
        self._token_cost: tuple[int, float] = (-1, 0.0)

    def window_rows(self, c: Candidates, limit: int, layout: OverlapLayout = OverlapLayout.FUSED) -> int:
        """The most CPU rows (up to limit) whose attention and doorbell fit the ASYNC_OVERLAP window of this layout:
        the largest k whose exposed wait is 0 by the cost model's rule for one sub-batch (cost.model.sub_batch_costs,
        at the fitted factors). Each probe prices a sub-batch, and the window moves little from step to step, so the
        search starts from the last one found."""
        m = self.model

        def fits(k: int) -> bool:
            sb = c.gpu_part(k)
            return sb is None or m.priced(sb, layout).exposed_wait <= 0.0

        rows = limit if fits(limit) else largest_fitting(fits, 0, limit - 1, self._window_hints.get(layout))
        self._window_hints[layout] = rows
        return rows

    def chunk_tokens(self, decode: Candidates, budget: int) -> int:
        """The ridge of the decode step (none to carry: the budget): the prefill tokens whose compute takes as long as
        the step's accelerator work, at the cost model's per-token cost of a compute-bound chunk (between
        COMPUTE_BOUND_CHUNKS). The step: decode's accelerator rows and, with CPU candidates, as many as one sub-batch
        stages in ASYNC_OVERLAP; its accelerator work leaves out the wait for CPU attention that outlasts the window: a
        layer's linear passes over all its rows, a chunk's too, run before it waits, so a chunk lengthens the step by
        its compute however long the wait (cost.model prices it so). Below the ridge a chunk rides that work at little
        cost: the pass over the weights. A long prompt's budget-sized chunk in one step instead leaves the steps after
        it to decode alone, each paying the weight pass for a few rows: where prompts are long and the accelerator's
        pool holds a few requests, spreading them at the ridge yields more tokens per second at a shorter step
        (docs/paper-reproduction.md)."""
        if not (decode.gpu_rows or decode.num_cpu):
            return budget
        observed = self.model.num_observed
        if self._token_cost[0] != observed:
            short, long = (self.gpu_only(Candidates([n], 1, 1, [0], 0, 1)).estimate_ns for n in COMPUTE_BOUND_CHUNKS)
            self._token_cost = (observed, (long - short) / (COMPUTE_BOUND_CHUNKS[1] - COMPUTE_BOUND_CHUNKS[0]))
        per_token = self._token_cost[1]
        if per_token <= 0:
            return budget
        k = min(decode.num_cpu, decode.max_cpu_rows)
        step = self.async_overlap(decode, k) if k else self.gpu_only(decode)
        work = step.estimate_ns - step.exposed_wait_ns
        return min(budget, max(1, math.ceil(work / per_token)))

    def options(self, c: Candidates, plain: Choice | None = None) -> list[Choice]:
        """The options apex weighs (c's forced candidates in each): GPU_ONLY (plain, where the caller has built it)
        unless rows are forced; per layout, ASYNC_OVERLAP sized to the window and at the limit (and, where that breaks
        the TPOT step, at the most rows that keep it) and ASYM_PIPELINE in PIPELINE_LAYOUT; an option FUSED at the
        limit dominates is left out (_fused_dominates). Pipelining is priced even where APEX eq. 6 says it cannot beat
        GPU_ONLY for these rows: GPU_ONLY cannot run the CPU rows, and beside ASYNC_OVERLAP with many of them it may
        still win (LLaMA-3.1-8B on an A10, tests/unit/test_policies.py)."""
        options = [] if c.forced else [self.gpu_only(c) if plain is None else plain]
        limit = min(c.num_cpu, c.max_cpu_rows)
        if not limit:
            return options
        low = max(1, min(c.forced, limit))
        k0, k1 = self.pipeline_rows(c)
        tpot_ns = self.objective.tpot_ns
        fused_holds_all = False  # FUSED's window holds every row up to the limit (FUSED comes first)
        for layout in _LAYOUTS:
            if layout is OverlapLayout.SPLIT and fused_holds_all and self._fused_dominates(
                    ExecutionMode.ASYNC_OVERLAP, layout):
                continue
            window = self.window_rows(c, limit, layout)
            if layout is OverlapLayout.FUSED:
                fused_holds_all = window == limit
            sized = max(low, window)
            options += [self.async_overlap(c, k, layout) for k in ((sized,) if sized == limit else (sized, limit))]
            if tpot_ns and options[-1].estimate_ns > tpot_ns:
                k = largest_fitting(lambda k, lo=layout: self.async_overlap(c, k, lo).estimate_ns <= tpot_ns,
                                    low, limit)
                options.append(self.async_overlap(c, k, layout))
        if k0 + k1 and not (k0 + k1 == limit and fused_holds_all and self._fused_dominates(
                ExecutionMode.ASYM_PIPELINE, self.layout)):
            options.append(self.asym_pipeline(c, k0, k1, self.layout))
        return options

    def _fused_dominates(self, mode: ExecutionMode, layout: OverlapLayout) -> bool:
        """Where FUSED's window holds every row up to the limit (its exposed wait is 0), whether no option of this mode
        and layout with as many rows can outscore ASYNC_OVERLAP FUSED at the limit. SPLIT runs the same rows with a
        second pass over the QKV weights and ASYM_PIPELINE with a second pass over all of them (one GEMM call over
        a + b rows costs no more than two calls over a and b), with the same attention and staging and no less wait:
        either wins only with a lower residual factor. Only without an objective: with one, options are ranked by
        their full predictions, whose correction is not one factor per mode and layout. Where scores tie, FUSED's
        option comes first and is taken all the same."""
        if self.objective.any:
            return False
        m = self.model
        return m.residual_factor(mode, layout) >= m.residual_factor(ExecutionMode.ASYNC_OVERLAP, OverlapLayout.FUSED)

    def best(self, c: Candidates) -> Choice:
        """The option of the best idle-aware score (the module docstring) among those that keep the objectives and,
        with none set, the MAX_IDLE_SHARE bound (_Predicting._decide: what gives way where none does)."""
        return self._decide(c, self.options, idle_aware_tokens_per_s, self._bounded)

    def _bounded(self, o: Choice, plain: Choice) -> bool:
        """The no-objective bound: exposed wait <= MAX_IDLE_SHARE x GPU_ONLY's step (plain) for the same accelerator
        rows and prefills (none to keep with an objective set, or without accelerator work)."""
        if self.objective.any or plain.shape is None:
            return True
        return o.exposed_wait_ns <= MAX_IDLE_SHARE * plain.estimate_ns

    def _score(self, choice: Choice) -> float:
        return idle_aware_tokens_per_s(choice)

    def _steady_options(self, steady: Candidates) -> list[Choice]:
        limit = min(steady.num_cpu, steady.max_cpu_rows)
        options = [self.gpu_only(steady)]
        for layout in _LAYOUTS if limit else ():
            options.append(self.async_overlap(steady, limit, layout))
        piped = self.pipeline(steady) if limit else None
        if piped is not None:
            options.append(piped)
        return options


def make_policy(name: str, cost_model: ComposedCostModel | None,
                objective: LatencyObjective = NO_OBJECTIVE) -> Policy:
    if name == "gpu-only":
        return GpuOnlyPolicy(cost_model)
    if cost_model is None:
        raise ValueError(f"policy: {name!r} needs a cost model (the profiler's tables); run a profile first")
    if name == "neo":
        return NeoPolicy(cost_model, objective)
    if name == "apex":
        return ApexPolicy(cost_model, objective)
    raise ValueError(f"policy: unknown {name!r}")
