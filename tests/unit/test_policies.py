"""Each policy's choice on hand-built iterations where the right answer is known (ConstantCosts add up by hand)."""

import pytest

from apex_serve.types import ExecutionMode
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.cost.shape import ModelShape
from scheduler_service.policies import (
    ApexPolicy,
    Candidates,
    GpuOnlyPolicy,
    LatencyObjective,
    NeoPolicy,
    make_policy,
    tokens_per_s,
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
    return Candidates(list(prefill), gpu_rows, context, [i * context for i in range(cpu + 1)], forced, max_cpu_rows)


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


def test_apex_sizes_async_rows_to_the_overlap_window_when_exposed_wait_does_not_pay() -> None:
    # window = GPU attention (4 rows x 100 tokens x 10 ns = 4 us) + the QKV share of the linear pass;
    # each CPU row costs 10 us of CPU attention: rows beyond the window add more wait than their tokens are worth
    cost_model = model(catt_ns_per_kv_token=100.0, lin_ns=10_000.0, lin_ns_per_token=0.0)
    policy = ApexPolicy(cost_model)
    c = candidates(gpu_rows=4, cpu=16)
    window_rows = policy.window_rows(c, 16)
    qkv_share = 10_000.0 * MODEL.qkv_fraction * 4 / (4 + window_rows)
    assert 100.0 * 100 * window_rows + 1_000.0 <= 4_000.0 + qkv_share  # the sized rows fit ...
    assert 100.0 * 100 * (window_rows + 1) + 1_000.0 > 4_000.0 + 10_000.0 * MODEL.qkv_fraction * 4 / (5 + window_rows)
    choice = policy.choose(c)
    assert choice.mode is ExecutionMode.ASYNC_OVERLAP
    assert choice.cpu_rows >= max(window_rows, 1)


def test_apex_picks_the_best_predicted_tokens_per_second_of_the_options_it_weighs() -> None:
    policy = ApexPolicy(model(catt_ns_per_kv_token=300.0))
    c = candidates()
    choice = policy.choose(c)
    weighed = [policy.gpu_only(c), policy.async_overlap(c, max(1, policy.window_rows(c, 16))),
               policy.async_overlap(c, 16)]
    assert tokens_per_s(choice) == pytest.approx(max(tokens_per_s(o) for o in weighed))
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


def test_apex_eq6_gate_keeps_pipelining_out_when_the_cpu_is_far_slower_than_the_gpu() -> None:
    policy = ApexPolicy(model(catt_ns_per_kv_token=100_000.0))
    c = candidates()
    assert not policy._gate(c, 16)
    assert policy.choose(c).mode is not ExecutionMode.ASYM_PIPELINE


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


def test_apex_with_a_tpot_target_refuses_a_request_that_would_break_it() -> None:
    policy = ApexPolicy(model(catt_ns_per_kv_token=1.0, lin_ns_per_token=100_000.0), LatencyObjective(tpot_ms=10.0))
    assert policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=4))
    assert not policy.admits(candidates(cpu=0, prefill=(10, 200)), candidates(cpu=4)), "this iteration breaks it"
    assert not policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=30)), "the decode steps after break it"
    assert not policy.admits(candidates(cpu=0, prefill=(10,)), candidates(cpu=4, max_cpu_rows=3)), "rows would sit out"
    assert ApexPolicy(model(catt_ns_per_kv_token=1.0)).admits(candidates(prefill=(4000,) * 8), candidates(cpu=400))


def test_hybrid_policies_need_a_cost_model() -> None:
    with pytest.raises(ValueError, match="^policy: 'apex' needs a cost model"):
        make_policy("apex", None)
