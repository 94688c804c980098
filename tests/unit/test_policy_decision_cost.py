"""What makes a decision cheap must not change it: the cost model memoises sub-batch prices within a decision, the
policies share sub-batches between options, NEO's fill reads the same prices the composition does, apex's window
search and NEO's fill start from the last ones found, apex leaves out options FUSED dominates, and a refused CPU row
is not asked again until the requests or the fit change."""

from collections import Counter
from dataclasses import replace

import pytest

from apex_serve.types import ExecutionMode, OverlapLayout, SamplingParams, StepTimings
from apex_tools.sim.hardware import T4
from scheduler_service.cost.analytic import AnalyticCostModel
from scheduler_service.cost.model import ComposedCostModel, ConstantCostModel, ConstantCosts, compose
from scheduler_service.cost.shape import ModelShape
from scheduler_service.cpu_placement import CpuPlacement
from scheduler_service.decision import Candidates, idle_aware_tokens_per_s
from scheduler_service.kv_manager import KVManager
from scheduler_service.policies import ApexPolicy, NeoPolicy
from scheduler_service.request import Request
from scheduler_service.row_search import largest_fitting

LLAMA_7B = ModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_q_heads=32, num_kv_heads=32,
                      head_dim=128, vocab_size=32000)
TINY = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_q_heads=8, num_kv_heads=2, head_dim=32,
                  vocab_size=1000)


def analytic() -> AnalyticCostModel:
    return AnalyticCostModel(T4, LLAMA_7B)


def candidates(gpu_rows: int, cpu: int, context: int, prefill: tuple[int, ...] = (), prefill_contexts: tuple[int, ...]
               = (), max_cpu_rows: int = 64) -> Candidates:
    return Candidates(list(prefill), gpu_rows, gpu_rows * context, [i * context for i in range(cpu + 1)], 0,
                      max_cpu_rows, prefill_contexts)


# decode-only, decode with whole prompts, and decode with later chunks of prompts
STATES = [candidates(96, 48, 700), candidates(32, 40, 900, prefill=(300, 64)),
          candidates(8, 24, 400, prefill=(128,), prefill_contexts=(512,))]


def observed(model: ComposedCostModel, c: Candidates) -> None:
    """One measured ASYNC_OVERLAP step of c with 8 CPU rows, slower than profiled, the CPU's attention twice."""
    shape = ApexPolicy(model).async_overlap(c, 8).shape
    raw = model.predict_raw(shape)
    model.observe(shape, model.predict(shape), StepTimings(
        total_ns=int(1.4 * raw.total_ns), device_linear_ns=int(1.2 * raw.linear_ns / LLAMA_7B.layers_linear_share),
        device_attention_ns=int(1.3 * raw.device_attention_ns), cpu_attention_ns=int(2.0 * raw.cpu_attention_ns)))


@pytest.mark.parametrize("policy_type", [NeoPolicy, ApexPolicy])
def test_a_decision_is_the_same_whatever_the_cost_model_priced_before_it(policy_type: type[NeoPolicy]) -> None:
    busy, fresh = analytic(), analytic()
    busy_policy = policy_type(busy)
    for c in STATES:  # fills the memo with other decisions' prices
        busy_policy.choose(c)
    for c in STATES:
        assert busy_policy.choose(c) == policy_type(fresh).choose(c) == busy_policy.choose(c)


def test_every_option_apex_weighs_is_priced_as_its_shape_composes() -> None:
    # options of one decision share sub-batches (GPU_ONLY's is the pipeline's sub-batch 0) and differ in layout only
    # for the same rows: each is still priced as a composition of its own shape would be
    model = analytic()
    policy = ApexPolicy(model)
    for c in STATES:
        for o in policy.options(c):
            composed = compose(model.costs, model.model, o.shape, model.factors)
            residual = model.residual_factor(o.mode, o.shape.run_layout)
            assert (o.estimate_ns, o.exposed_wait_ns) == (composed.total_ns * residual,
                                                          composed.exposed_wait_ns * residual)


@pytest.mark.parametrize("policy_type", [NeoPolicy, ApexPolicy])
def test_a_decision_after_a_measured_step_uses_the_factors_that_step_fitted(policy_type: type[NeoPolicy]) -> None:
    # the busy model priced every state before the step moved its factors: none of those prices may be re-used
    busy, fresh = analytic(), analytic()
    for c in STATES:
        policy_type(busy).choose(c)
    observed(busy, STATES[0])
    observed(fresh, STATES[0])
    assert busy.factors.cpu_attention > 1.0  # the step moved the factors the decisions price with
    for c in STATES:
        assert policy_type(busy).choose(c) == policy_type(fresh).choose(c)


def test_apex_takes_the_best_scored_of_the_options_it_weighs_and_takes_it_again() -> None:
    # CPU attention longer than FUSED's window: no option is dominated
    policy = ApexPolicy(ConstantCostModel(ConstantCosts(lin_ns=1_000_000.0, lin_ns_per_token=1_000.0,
                                                        gatt_ns_per_kv_token=10.0, catt_ns_per_kv_token=10.0,
                                                        sync_ns=1_000.0, step_ns=100_000.0), TINY))
    c = candidates(16, 24, 100)
    options = policy.options(c)
    assert {o.mode for o in options} == set(ExecutionMode)  # all three weighed, none over the idle bound here
    choice = policy.choose(c)
    assert choice == max(options, key=idle_aware_tokens_per_s)
    assert policy.choose(c) == choice


@pytest.mark.parametrize("c", STATES)
def test_neo_fills_its_pipeline_with_rows_whose_wait_the_composition_hides(c: Candidates) -> None:
    # NEO sizes both sub-batches by the cost model's own prices, so the composed pipeline exposes no wait, at the
    # profiled factors and after a step that found the CPU's attention twice as slow
    model = analytic()
    for _ in range(2):
        piped = NeoPolicy(model).pipeline(c)
        assert piped is not None and piped.mode is ExecutionMode.ASYM_PIPELINE and piped.cpu_rows_in_sub_batch_1
        assert compose(model.costs, model.model, piped.shape, model.factors).exposed_wait_ns == 0.0
        observed(model, c)


@pytest.mark.parametrize("hint", [None, 0, 3, 17, 18, 19, 40, 63, 64, 200, -5])
@pytest.mark.parametrize("answer", [0, 1, 17, 18, 63, 64])
def test_the_window_search_finds_the_same_rows_from_any_hint(answer: int, hint: int | None) -> None:
    probes: list[int] = []

    def fits(k: int) -> bool:
        probes.append(k)
        return k <= answer

    assert largest_fitting(fits, 0, 64, hint) == answer
    if hint == answer and 0 < answer < 64:
        assert len(probes) == 2, f"a window that did not move took {len(probes)} probes: {probes}"


def test_apex_decides_the_same_with_its_window_hints_as_a_fresh_policy_on_each_step() -> None:
    model = analytic()
    kept = ApexPolicy(model)
    for c in [*STATES, *STATES[::-1], candidates(96, 48, 720), candidates(64, 60, 300)]:
        assert kept.best(c) == ApexPolicy(model).best(c)


class CountingPolicy:
    """Grants a CPU row when `gains` says so, counting the times it was asked."""

    name, uses_cpu = "counting", True

    def __init__(self, cost_model: ComposedCostModel) -> None:
        self.cost_model = cost_model
        self.gains, self.asked = False, 0

    def gains_from_cpu_rows(self, steady: Candidates, contexts: list[int]) -> bool:
        self.asked += 1
        return self.gains


def test_a_refused_cpu_row_is_asked_again_once_the_cost_model_has_observed_a_step() -> None:
    model = analytic()
    policy = CountingPolicy(model)
    kv = KVManager(8, 0, 16)
    kv.set_cpu_pool(64)
    placement = CpuPlacement(policy, kv, max_rows=4, max_sit_out=4)  # type: ignore[arg-type]
    gpu = [Request(f"g{i}", (1,) * 40, SamplingParams(max_tokens=8), 47) for i in range(2)]
    new = Request("new", (1,) * 40, SamplingParams(max_tokens=8), 47)
    assert not placement.takes(new, gpu, [], [0], 0)
    assert not placement.takes(new, gpu, [], [0], 0) and policy.asked == 1  # nothing changed: the refusal holds
    shape = ApexPolicy(model).gpu_only(STATES[0]).shape
    model.observe(shape, model.predict(shape), StepTimings(total_ns=int(2 * model.predict(shape).total_ns)))
    policy.gains = True
    assert placement.takes(new, gpu, [], [0], 0) and policy.asked == 2


def test_neo_fills_the_same_with_its_hints_as_a_fresh_policy_on_each_step() -> None:
    model = analytic()
    kept = NeoPolicy(model)
    for c in [*STATES, *STATES[::-1], candidates(96, 48, 720), candidates(64, 60, 300), candidates(0, 40, 500)]:
        assert kept.pipeline_rows(c) == NeoPolicy(model).pipeline_rows(c)
        assert kept.best(c) == NeoPolicy(model).best(c)


class EveryOptionApex(ApexPolicy):
    """apex weighing SPLIT and ASYM_PIPELINE on every decision."""

    def _fused_dominates(self, mode: ExecutionMode, layout: OverlapLayout) -> bool:
        return False


def observed_at(model: ComposedCostModel, c: Candidates, layout: OverlapLayout, ratio: float) -> None:
    """One measured ASYNC_OVERLAP step of c in `layout` at `ratio` times its raw prediction (that layout's residual)."""
    shape = ApexPolicy(model).async_overlap(c, 8, layout).shape
    model.observe(shape, model.predict(shape), StepTimings(total_ns=int(ratio * model.predict_raw(shape).total_ns)))


@pytest.mark.parametrize("split_ratio", [0.5, 1.0, 2.0])
def test_apex_leaves_out_only_options_that_cannot_outscore_fused(split_ratio: float) -> None:
    # a host fast enough that FUSED's window holds every CPU row of some states; SPLIT's steps measured below, at and
    # above their prediction, FUSED's at it (ASYM_PIPELINE borrows a fit): an option is left out only where its
    # residual factor is not the lower one, and never changes the choice
    fast_host = AnalyticCostModel(replace(T4, host_dram_bytes_per_s=40 * T4.host_dram_bytes_per_s), LLAMA_7B)
    states = [*STATES, candidates(128, 128, 700, max_cpu_rows=128), candidates(4, 64, 300),
              candidates(128, 256, 700, max_cpu_rows=128), candidates(16, 48, 300, max_cpu_rows=16)]
    left_out: Counter[tuple[ExecutionMode, OverlapLayout]] = Counter()
    for model in (analytic(), fast_host):
        observed_at(model, STATES[0], OverlapLayout.FUSED, 1.0)
        observed_at(model, STATES[0], OverlapLayout.SPLIT, split_ratio)
        for c in states:
            apex, every = ApexPolicy(model), EveryOptionApex(model)
            weighed = {(o.mode, o.layout) for o in apex.options(c)}
            left_out.update((o.mode, o.layout) for o in every.options(c) if (o.mode, o.layout) not in weighed)
            assert apex.best(c) == every.best(c)
    assert (left_out[ExecutionMode.ASYNC_OVERLAP, OverlapLayout.SPLIT] > 0) == (split_ratio >= 1.0), left_out
    if split_ratio == 1.0:
        assert left_out[ExecutionMode.ASYM_PIPELINE, OverlapLayout.FUSED] > 0, left_out
