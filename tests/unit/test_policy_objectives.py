"""The latency objectives (--tpot-slo-ms, --ttft-slo-ms) and apex's bound without one, on hand-built iterations whose
predicted steps add up by hand (ConstantCosts, 4 layers, 100 us of step overhead)."""

import pytest

from apex_serve.types import ExecutionMode, OverlapLayout, SamplingParams
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.cost.shape import ModelShape
from scheduler_service.decision import Candidates
from scheduler_service.latency_clock import PredictedClock
from scheduler_service.objectives import LatencyObjective
from scheduler_service.policies import MAX_IDLE_SHARE, ApexPolicy, NeoPolicy, make_policy
from scheduler_service.prefill import Chunk
from scheduler_service.request import Request

MODEL = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_q_heads=8, num_kv_heads=2, head_dim=32,
                   vocab_size=1000)
COMMON = {"gatt_ns_per_kv_token": 10.0, "sync_ns": 1_000.0, "step_ns": 100_000.0}


def model(**costs: float) -> ConstantCostModel:
    return ConstantCostModel(ConstantCosts(**(COMMON | costs)), MODEL)


def candidates(gpu_rows: int, cpu: int, max_cpu_rows: int = 32, **latency: tuple) -> Candidates:
    return Candidates([], gpu_rows, gpu_rows * 100, [i * 100 for i in range(cpu + 1)], 0, max_cpu_rows, **latency)


# 16 accelerator rows, 2 CPU rows of 10 us each: 1 row hides (564 us step), 2 expose 5 us a layer (584 us)
SIT_OUT = {"lin_ns": 100_000.0, "catt_ns_per_kv_token": 100.0}


def test_a_cpu_candidate_whose_tpot_would_break_by_sitting_out_once_more_runs_now() -> None:
    policy = ApexPolicy(model(**SIT_OUT), LatencyObjective(tpot_ms=1.5))
    # sat out 0: sitting out once more gives 2 steps between tokens, 1.13 ms: the overflow row may wait
    assert policy.choose(candidates(16, 2, cpu_sat_out=(0, 0))).cpu_rows == 1
    # sat out 1: once more would give 3 x 564 us = 1.69 ms > 1.5 ms: both run now, the step stays under 1.5 ms
    choice = policy.choose(candidates(16, 2, cpu_sat_out=(1, 1)))
    assert (choice.mode, choice.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, 2)
    assert choice.estimate_ns == pytest.approx(584_000)


@pytest.mark.parametrize("policy_type", [NeoPolicy, ApexPolicy])
def test_cpu_candidates_sit_out_a_step_whose_accelerator_work_alone_breaks_the_tpot_objective(
        policy_type: type[NeoPolicy]) -> None:
    # GPU_ONLY's 564 us already break a 0.5 ms objective: the candidates due by it cannot be served within it, so
    # they wait (max_sit_out still bounds them) instead of lengthening a step that is over the objective anyway
    choice = policy_type(model(**SIT_OUT), LatencyObjective(tpot_ms=0.5)).choose(candidates(16, 2, cpu_sat_out=(1, 1)))
    assert (choice.mode, choice.cpu_rows, choice.estimate_ns) == (ExecutionMode.GPU_ONLY, 0, pytest.approx(564_000))


@pytest.mark.parametrize("policy_type", [NeoPolicy, ApexPolicy])
def test_cpu_requests_alone_decode_even_where_no_step_keeps_the_tpot_objective(policy_type: type[NeoPolicy]) -> None:
    # nothing on the accelerator, nothing forced, and every option over a 0.1 ms objective: waiting would leave an
    # empty plan with requests running (they would never decode), so the shortest step with CPU rows runs
    choice = policy_type(model(**SIT_OUT), LatencyObjective(tpot_ms=0.1)).choose(candidates(0, 4, cpu_sat_out=(0,) * 4))
    assert choice.cpu_rows > 0 and choice.shape is not None


def test_apex_drops_cpu_rows_that_would_push_a_waiting_request_past_its_ttft_objective() -> None:
    # 64 accelerator rows (612 us alone); 7 CPU rows hide under SPLIT's window at a 640 us step
    policy = ApexPolicy(model(lin_ns_per_token=1_000.0, catt_ns_per_kv_token=100.0), LatencyObjective(ttft_ms=1.0))
    free = policy.choose(candidates(64, 7))
    assert (free.layout, free.cpu_rows, free.estimate_ns) == (OverlapLayout.SPLIT, 7, pytest.approx(640_000))
    # waited 370 us, first token after this step: 982 us under GPU_ONLY, 1010 us with the CPU rows
    assert policy.choose(candidates(64, 7, first_token_waits=((370_000.0, 1),))).mode is ExecutionMode.GPU_ONLY
    # waited 400 us: even GPU_ONLY's 1012 us misses the objective, so the CPU rows do not cost it anything
    assert policy.choose(candidates(64, 7, first_token_waits=((400_000.0, 1),))).cpu_rows == 7


# 4 accelerator rows, weight-bound 1 ms linear calls (GPU_ONLY: 4.116 ms); 16 CPU rows of 30 us each
BOUND = {"lin_ns": 1_000_000.0, "catt_ns_per_kv_token": 300.0}


def test_apex_without_an_objective_keeps_the_exposed_wait_within_max_idle_share_of_gpu_only_step() -> None:
    c = candidates(4, 16)
    bounded = ApexPolicy(model(**BOUND))
    plain = bounded.gpu_only(c).estimate_ns
    assert plain == pytest.approx(4_116_000)
    # all 16 rows in ASYNC_OVERLAP leave the accelerator waiting 1.2 ms (SPLIT) to 1.9 ms (FUSED): > 25% of 4.116 ms
    free = ApexPolicy(model(**BOUND), LatencyObjective(tpot_ms=100.0))  # an objective replaces the bound
    unbounded = free.choose(c)
    assert (unbounded.mode, unbounded.cpu_rows) == (ExecutionMode.ASYNC_OVERLAP, 16)
    assert unbounded.exposed_wait_ns > MAX_IDLE_SHARE * plain
    # bounded, the rows pipeline instead (NEO's sub-batch 1 hides behind the accelerator rows' 1 ms pass)
    choice = bounded.choose(c)
    assert (choice.mode, choice.cpu_rows, choice.exposed_wait_ns) == (ExecutionMode.ASYM_PIPELINE, 16, 0.0)
    assert choice.estimate_ns == pytest.approx(4 * (1_000_000 + 4_000 + 1_000_000) + 100_000)


# the weight-bound regime of tests/unit/test_policies.py: NEO's pipeline streams the weights twice (8.2 ms a step)
NEO = {"lin_ns": 1_000_000.0, "lin_ns_per_token": 1_000.0, "pref_ns_per_token": 100.0,
       "catt_ns_per_kv_token": 10.0}


def test_neo_under_a_tpot_objective_keeps_gpu_only_where_its_pipeline_step_breaks_it() -> None:
    c = candidates(4, 16, max_cpu_rows=8)
    assert NeoPolicy(model(**NEO)).choose(c).mode is ExecutionMode.ASYM_PIPELINE
    choice = NeoPolicy(model(**NEO), LatencyObjective(tpot_ms=6.0)).choose(c)
    assert choice.mode is ExecutionMode.GPU_ONLY
    assert choice.estimate_ns <= 6e6


@pytest.mark.parametrize(("policy_type", "num_cpu", "tpot_ms"), [(ApexPolicy, 2, 6.7), (NeoPolicy, 3, 10.0)])
def test_hybrid_policies_take_no_cpu_request_whose_rows_would_lengthen_the_steady_step_past_the_tpot_objective(
        policy_type: type[NeoPolicy], num_cpu: int, tpot_ms: float) -> None:
    # each row adds 0.4 ms of linear work (100 us a token, 4 layers): apex's overlap of 2 CPU rows takes 6.5 ms and
    # of 3 rows 6.9 ms; neo pipelines from the 4th CPU request on, at 11.3 ms a step: more tokens/s, past the objective
    costs = {"lin_ns": 1_000_000.0, "lin_ns_per_token": 100_000.0, "catt_ns_per_kv_token": 1.0}
    steady = candidates(4, num_cpu)
    assert policy_type(model(**costs)).gains_from_cpu_rows(steady, [100])
    assert not policy_type(model(**costs), LatencyObjective(tpot_ms=tpot_ms)).gains_from_cpu_rows(steady, [100])


@pytest.mark.parametrize("policy_type", [NeoPolicy, ApexPolicy])
def test_hybrid_policies_admit_no_request_whose_steady_rotation_would_break_the_tpot_objective(
        policy_type: type[NeoPolicy]) -> None:
    # 4 accelerator rows, 2 CPU rows an iteration in ASYNC_OVERLAP (4.14 ms) or 2 + 2 pipelined (8.2 ms): 4 CPU
    # requests decode every 2 overlap steps (8.3 ms) or every pipelined step; a 5th makes it 3 overlap steps (12.4 ms)
    # or 2 pipelined ones (16.4 ms)
    policy = policy_type(model(**NEO), LatencyObjective(tpot_ms=10.0))
    assert policy.admits(candidates(4, 0), candidates(4, 4, max_cpu_rows=2))
    assert not policy.admits(candidates(4, 0), candidates(4, 5, max_cpu_rows=2))


def test_gpu_only_ignores_the_objectives() -> None:
    policy = make_policy("gpu-only", None, LatencyObjective(tpot_ms=0.001, ttft_ms=0.001))
    assert policy.admits(candidates(4, 0), candidates(400, 0))
    assert policy.choose(candidates(4, 0)).mode is ExecutionMode.GPU_ONLY


def test_objective_rules_add_up() -> None:
    objective = LatencyObjective(tpot_ms=1.0, ttft_ms=2.0)
    assert objective.due((3, 2, 1, 0), 300_000.0) == 2  # (s + 2) x 0.3 ms > 1 ms for s = 3, 2
    assert objective.keeps_tpot(300_000.0, 2, (3, 2, 1, 0)) and not objective.keeps_tpot(300_000.0, 1, (3, 2, 1, 0))
    assert objective.keeps_steady_tpot(250_000.0, 2, 8) and not objective.keeps_steady_tpot(250_000.0, 2, 9)
    assert not objective.keeps_steady_tpot(1.0, 0, 1)  # CPU requests that never decode
    assert objective.keeps_ttft(500_000.0, 400_000.0, ((1_000_000.0, 2),))
    assert not objective.keeps_ttft(600_000.0, 400_000.0, ((1_000_000.0, 2),))
    assert objective.keeps_ttft(600_000.0, 600_000.0, ((1_000_000.0, 2),))  # missed at the shortest step too


def test_predicted_clock_weighs_each_request_by_its_wait_and_the_chunks_left() -> None:
    clock = PredictedClock()
    requests = [Request(f"r{i}", tuple(range(n)), SamplingParams(), n + 8) for i, n in enumerate((250, 40, 30))]
    clock.arrive("r0")
    clock.advance(1_000.0)
    clock.arrive("r1")
    clock.arrive("r2")
    clock.advance(500.0)
    # r0 prefills its first 100 tokens now (150 left: 2 more chunks); r1, r2 wait (one chunk each, after this step)
    assert clock.first_token_waits([Chunk(requests[0], 0, 100)], requests[1:], 100) == ((1_500.0, 3), (500.0, 2),
                                                                                   (500.0, 2))
    requests[1].take_token(7)  # resumed after a preemption: its first token is out
    assert clock.first_token_waits([], requests[1:], 100) == ((500.0, 2),)
