"""Each policy's choice on hand-built iterations where the right answer is known (ConstantCosts add up by hand), and one
iteration the simulator met on the A10 preset."""

from dataclasses import replace
from itertools import accumulate

import pytest

from apex_serve.types import ExecutionMode, OverlapLayout
from apex_tools.sim.setups import published_setup
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts, pipelining_beats_gpu_only
from scheduler_service.cost.shape import ModelShape
from scheduler_service.decision import Candidates, Choice, idle_aware_tokens_per_s, tokens_per_s
from scheduler_service.policies import (
    MAX_IDLE_SHARE,
    ApexPolicy,
    GpuOnlyPolicy,
    LatencyObjective,
    NeoPolicy,
    make_policy,
)

MODEL = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_q_heads=8, num_kv_heads=2, head_dim=32,
                   vocab_size=1000)
# linear work dominates, batch is nearly free (the weight-streaming regime), GPU attention is cheap
BASE = dict(lin_ns=1_000_000.0, lin_ns_per_token=1_000.0, pref_ns_per_token=100.0, gatt_ns_per_kv_token=10.0,
            xfer_ns_per_byte=0.0, sync_ns=1_000.0, step_ns=100_000.0)


def model(catt_ns_per_kv_token: float, **extra: float) -> ConstantCostModel:
    return ConstantCostModel(ConstantCosts(**(BASE | extra), catt_ns_per_kv_token=catt_ns_per_kv_token), MODEL)


def candidates(gpu_rows: int = 4, cpu: int = 16, context: int = 100, forced: int = 0, max_cpu_rows: int = 32,
               prefill: tuple[int, ...] = ()) -> Candidates:
    return Candidates(list(prefill), gpu_rows, gpu_rows * context, [i * context for i in range(cpu + 1)], forced,
                      max_cpu_rows)


def test_gpu_only_policy_never_runs_cpu_rows() -> None:
    choice = GpuOnlyPolicy(None).choose(candidates())
    assert (choice.mode, choice.cpu_rows) == (ExecutionMode.GPU_ONLY, 0)


def test_apex_runs_every_cpu_row_it_can_stage_when_cpu_attention_is_cheap() -> None:
    choice = ApexPolicy(model(catt_ns_per_kv_token=1.0)).choose(candidates(cpu=16, max_cpu_rows=12))
    assert (choice.mode, choice.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, 12)


def test_apex_stays_gpu_only_when_cpu_attention_costs_more_than_its_rows_yield() -> None:
    # one CPU row of 100 tokens costs 100 ms a layer, far beyond the 1 ms linear pass it rides on
    choice = ApexPolicy(model(catt_ns_per_kv_token=1_000_000.0)).choose(candidates())
    assert (choice.mode, choice.cpu_rows) == (ExecutionMode.GPU_ONLY, 0)


# per layer: the window's sizes add up by hand (sync 1 us, a CPU row of 100 tokens 10 us of CPU attention)
WINDOW = {"lin_ns": 100_000.0, "gatt_ns_per_kv_token": 10.0, "catt_ns_per_kv_token": 100.0, "sync_ns": 1_000.0,
          "step_ns": 100_000.0}


def constant(**costs: float) -> ConstantCostModel:
    return ConstantCostModel(ConstantCosts(**costs), MODEL)


def test_apex_sizes_the_overlap_window_by_layout_from_the_composed_exposed_wait() -> None:
    # 16 accelerator rows of 100 tokens: 16 us of GPU attention. FUSED window: that alone, so 1 CPU row (11 us) fits
    # and 2 (21 us) do not. SPLIT window: + the others' QKV call (qkv x 100 us = 17.6 us) = 33.6 us: 3 rows (31 us).
    policy = ApexPolicy(constant(**WINDOW))
    c = candidates(gpu_rows=16, cpu=4)
    assert policy.window_rows(c, 4, OverlapLayout.FUSED) == 1
    assert policy.window_rows(c, 4, OverlapLayout.SPLIT) == 3
    assert policy.async_overlap(c, 3, OverlapLayout.SPLIT).exposed_wait_ns == 0.0
    assert policy.async_overlap(c, 4, OverlapLayout.SPLIT).exposed_wait_ns > 0.0


def test_apex_picks_the_fused_layout_where_the_cpu_rows_hide_under_the_accelerator_rows_attention() -> None:
    # weight-bound linear (1 ms a call whatever its rows): 16 CPU rows (1.6 us + 1 us sync) hide in the 4 us of GPU
    # attention; SPLIT would add a second QKV call (+ qkv x 1 ms a layer) for nothing
    policy = ApexPolicy(constant(lin_ns=1_000_000.0, gatt_ns_per_kv_token=10.0, catt_ns_per_kv_token=1.0,
                                 sync_ns=1_000.0, step_ns=100_000.0))
    choice = policy.choose(candidates(gpu_rows=4, cpu=16))
    assert (choice.mode, choice.layout, choice.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, OverlapLayout.FUSED, 16)
    assert choice.estimate_ns == pytest.approx(4 * (1_000_000 + 4_000) + 100_000)


def test_apex_picks_the_split_layout_where_the_other_rows_qkv_widens_the_window_for_free() -> None:
    # compute-bound linear (1 us a row, no cost per call): splitting the calls costs nothing. 64 accelerator rows:
    # 64 us of attention. 7 CPU rows need 71 us: FUSED hides 6 (61 us) and leaves 7 us a layer exposed with 7; SPLIT's
    # window adds the others' QKV, qkv x 64 us = 11.3 us, and hides all 7. Eq. 6 rules pipelining out (N_G/N_C = 10).
    policy = ApexPolicy(constant(lin_ns_per_token=1_000.0, gatt_ns_per_kv_token=10.0, catt_ns_per_kv_token=100.0,
                                 sync_ns=1_000.0, step_ns=100_000.0))
    c = candidates(gpu_rows=64, cpu=7)
    choice = policy.choose(c)
    assert (choice.mode, choice.layout, choice.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, OverlapLayout.SPLIT, 7)
    assert choice.estimate_ns == pytest.approx(4 * (71_000 + 64_000) + 100_000)  # 640 us, 71 tokens
    assert policy.async_overlap(c, 7, OverlapLayout.FUSED).estimate_ns == pytest.approx(4 * (71_000 + 64_000 + 7_000)
                                                                                     + 100_000)


def test_apex_defers_an_overflow_row_that_would_idle_the_accelerator_though_it_edges_out_per_step() -> None:
    # FUSED window 16 us: 1 CPU row fits (564 us step, 17 tokens); the 2nd adds 5 us a layer of exposed wait (584 us,
    # 18 tokens): 30.8k tokens/s against 30.1k per step, but with the idle time counted (18 / 604 us = 29.8k) the row
    # costs more than it brings: it sits out and is decoded later within a window. SPLIT (second QKV call, 634.5 us)
    # and the pipeline (a second weight pass, 964 us) cost more still.
    policy = ApexPolicy(constant(**WINDOW))
    c = candidates(gpu_rows=16, cpu=2)
    choice = policy.choose(c)
    assert (choice.mode, choice.layout, choice.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, OverlapLayout.FUSED, 1)
    assert choice.estimate_ns == pytest.approx(564_000)
    exposed = policy.async_overlap(c, 2, OverlapLayout.FUSED)
    assert (exposed.estimate_ns, exposed.exposed_wait_ns) == (pytest.approx(584_000), pytest.approx(20_000))
    assert tokens_per_s(exposed) > tokens_per_s(choice) > idle_aware_tokens_per_s(exposed)


def test_apex_picks_the_best_idle_aware_score_of_the_options_it_weighs() -> None:
    policy = ApexPolicy(model(catt_ns_per_kv_token=300.0))
    c = candidates()
    choice = policy.choose(c)
    bound = MAX_IDLE_SHARE * policy.gpu_only(c).estimate_ns
    weighed = [o for o in policy.options(c) if o.exposed_wait_ns <= bound]
    assert {o.layout for o in policy.options(c) if o.cpu_rows} == set(OverlapLayout)
    assert idle_aware_tokens_per_s(choice) == pytest.approx(max(idle_aware_tokens_per_s(o) for o in weighed))
    assert tokens_per_s(choice) > tokens_per_s(policy.gpu_only(c))


def test_neo_pipelines_cpu_rows_hidden_under_the_other_sub_batch() -> None:
    policy = NeoPolicy(model(catt_ns_per_kv_token=10.0))
    choice = policy.choose(candidates(cpu=16, max_cpu_rows=8))  # sub-batch 1 fills up: the rest go to sub-batch 0
    assert choice.mode is ExecutionMode.ASYM_PIPELINE
    assert (choice.cpu_rows, choice.cpu_rows_in_sub_batch_1) == (16, 8)
    assert policy.pipeline_rows(candidates(cpu=16, max_cpu_rows=8)) == (8, 8)


def test_neo_keeps_gpu_only_when_pipelining_predicts_fewer_tokens_per_second() -> None:
    # hiding a row needs catt <= the other sub-batch's device work; a 10 s row hides nowhere
    choice = NeoPolicy(model(catt_ns_per_kv_token=100_000_000.0)).choose(candidates())
    assert choice.mode is ExecutionMode.GPU_ONLY


def test_apex_does_not_pipeline_when_the_cpu_is_far_slower_than_the_gpu() -> None:
    choice = ApexPolicy(model(catt_ns_per_kv_token=100_000.0)).choose(candidates())
    assert choice.mode is not ExecutionMode.ASYM_PIPELINE


def test_apex_pipelines_where_eq6_rules_it_out_against_gpu_only_but_it_beats_asynchronous_overlap() -> None:
    # LLaMA-3.1-8B on the A10 preset, an iteration as the simulator met it (cot): 32 accelerator rows at 1,262 tokens
    # and 30 CPU candidates of 630 to 1,065 tokens, least recently decoded (and longest) first. GPU_ONLY cannot run
    # the CPU rows; beside ASYNC_OVERLAP with them, pipelining wins
    contexts = [1065, 942, 895, 997, 996, 1035, 996, 838, 926, 759, 815, 717, 774, 764, 768, 693, 966, 850, 762, 630,
                671, 687, 681, 762, 759, 672, 779, 707, 720, 663]
    setup = published_setup("a10", "llama3.1-8b", 4096, 256)
    policy = ApexPolicy(setup.cost_model())
    c = Candidates([], 32, 32 * 1262, list(accumulate(contexts, initial=0)), 0, 256)
    costs, cpu_kv = setup.costs, sum(contexts)
    t_lin, t_gatt, t_catt = costs.t_lin(62), costs.t_gatt(32, 32 * 1262), costs.t_catt(30, cpu_kv)
    assert not pipelining_beats_gpu_only(t_lin, t_gatt, 32 * 1262 / t_gatt, cpu_kv / t_catt)
    choice = policy.choose(c)
    assert choice.mode is ExecutionMode.ASYM_PIPELINE
    overlap = max((o for o in policy.options(c) if o.mode is ExecutionMode.ASYNC_OVERLAP),
                  key=idle_aware_tokens_per_s)
    assert idle_aware_tokens_per_s(choice) > idle_aware_tokens_per_s(overlap)


def test_apex_chunks_prompts_at_the_ridge_where_a_chunk_rides_the_decode_steps_pass_over_the_weights() -> None:
    # LLaMA-3.1-8B on the A10 preset, 14 accelerator rows of 2,600 tokens (summarize, as the simulator meets it)
    model = published_setup("a10", "llama3.1-8b", 4096, 256).cost_model()
    apex, gpu_only = ApexPolicy(model), GpuOnlyPolicy(model)

    def step_ns(prefill: int, rows: int = 14) -> float:
        return gpu_only.gpu_only(Candidates([prefill] if prefill else [], rows, rows * 2600, [0], 0, 1)).estimate_ns

    def decode(rows: int, cpu: int = 0) -> Candidates:
        return Candidates([], rows, rows * 2600, [i * 2600 for i in range(cpu + 1)], 0, 64)

    ridge = apex.chunk_tokens(decode(14), 4096)
    assert 128 < ridge < 1024
    # the ridge's tokens add to the decode step under half of what they cost in a full-budget step
    assert step_ns(ridge) - step_ns(0) < 0.5 * ridge * step_ns(4096) / 4096
    # more rows, a longer decode step, a higher ridge; nothing to carry: the budget
    assert apex.chunk_tokens(decode(56), 4096) > ridge
    assert apex.chunk_tokens(decode(0), 4096) == 4096
    # 40 CPU rows whose attention the accelerator waits for: the wait carries no chunk (a layer's linear passes run
    # before it), so the ridge's chunk beside them adds under half of its cost too
    with_cpu = decode(14, cpu=40)
    cpu_ridge = apex.chunk_tokens(with_cpu, 4096)

    def overlap(prefill: int) -> Choice:
        return apex.async_overlap(replace(with_cpu, prefill_lens=[prefill] if prefill else []), 40)

    alone = overlap(0)
    assert alone.exposed_wait_ns > alone.estimate_ns / 2
    assert overlap(cpu_ridge).estimate_ns - alone.estimate_ns < 0.5 * cpu_ridge * step_ns(4096) / 4096
    assert gpu_only.chunk_tokens(decode(14), 4096) == NeoPolicy(model).chunk_tokens(decode(14), 4096) == 4096


def test_forced_rows_rule_out_gpu_only_for_every_hybrid_policy() -> None:
    c = candidates(cpu=4, forced=2)
    for policy in (ApexPolicy(model(catt_ns_per_kv_token=1_000_000.0)), NeoPolicy(model(catt_ns_per_kv_token=1e6))):
        choice = policy.choose(c)
        assert choice.mode is not ExecutionMode.GPU_ONLY
        assert choice.cpu_rows >= 2


def test_apex_with_a_tpot_target_chooses_an_iteration_predicted_under_it() -> None:
    cost_model = model(catt_ns_per_kv_token=1.0, lin_ns_per_token=100_000.0)  # every row costs 0.4 ms over 4 layers
    free = ApexPolicy(cost_model).choose(candidates(cpu=32, max_cpu_rows=32))
    target_ms = free.estimate_ns / 1e6 * 0.6
    capped = ApexPolicy(cost_model, LatencyObjective(tpot_ms=target_ms)).choose(candidates(cpu=32, max_cpu_rows=32))
    assert capped.estimate_ns <= target_ms * 1e6
    assert 0 < capped.cpu_rows < free.cpu_rows


def test_apex_with_a_tpot_target_refuses_a_cpu_request_whose_decode_steps_would_break_it() -> None:
    policy = ApexPolicy(model(catt_ns_per_kv_token=1.0, lin_ns_per_token=100_000.0), LatencyObjective(tpot_ms=10.0))
    assert policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=4))
    assert policy.admits(candidates(cpu=0, prefill=(10, 200)), candidates(cpu=4)), "a prefill step is gpu-only's"
    assert not policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=30)), "the decode steps after break it"
    assert not policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=4, max_cpu_rows=3)), "rows would sit out"
    assert ApexPolicy(model(catt_ns_per_kv_token=1.0)).admits(candidates(prefill=(4000,) * 8), candidates(cpu=400))


def test_hybrid_policies_need_a_cost_model() -> None:
    with pytest.raises(ValueError, match="^policy: 'apex' needs a cost model"):
        make_policy("apex", None)
