"""The scheduler under a TPOT objective, on fabricated step results: the contract the end-to-end test reads from
GetStats (no iteration with CPU rows predicted above the objective, and some still run) and the CPU requests' turns
kept within it (the sit-out rule of scheduler_service.objectives)."""

import pytest

from apex_serve.engine_stats import IterationRecord
from apex_serve.types import Placement, SamplingParams, StepOutput, StepTimings
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ConstantCostModel
from scheduler_service.scheduler import Scheduler
from tests.unit.test_scheduler_pools import COSTS, MODEL, worker

GPU_ONLY_STEP_NS = 4 * (1_000_000 + 2_000 + 10 * 2 * 40) + 100_000  # 2 accelerator rows of ~40 tokens: ~4.1 ms


def run(policy: str, tpot_ms: float, max_sit_out: int = 8) -> tuple[list[IterationRecord], int]:
    """Twelve requests of 20 prompt and 40 output tokens, two at a time fitting the accelerator's pool, the steps
    measured 10% over the tables: the records and the most iterations a request went without a token."""
    s = Scheduler(SchedulerConfig(policy=policy, max_sit_out=max_sit_out, tpot_slo_ms=tpot_ms),
                  worker(gpu_blocks=32, cpu_blocks=2000, cpu_max_rows=2), ConstantCostModel(COSTS, MODEL))
    for i in range(12):
        s.add_request(f"r{i}", [5] * 20, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    records, worst = [], 0
    while s.has_work():
        plan = s.schedule()
        flight = s.in_flight
        sampled = {r.request_id: 7 for r in flight.sampling()}
        for request in s.running:  # the CPU requests' iterations since their last token, this one included
            if request.placement is Placement.CPU and not request.prefilling:
                worst = max(worst, plan.step_id - request.last_step + (request.request_id not in sampled))
        measured = int(1.1 * s.cost_model.predict_raw(flight.shape).total_ns) if flight.shape else 1_000_000
        records.append(s.update_from_output(plan, StepOutput(plan.step_id, sampled, StepTimings(total_ns=measured)))
                       .record)
    return [r for r in records if r is not None], worst


@pytest.mark.parametrize(("policy", "slack"), [("apex", 1.2), ("neo", 2.5)])
def test_no_iteration_with_cpu_rows_is_predicted_above_the_tpot_objective(policy: str, slack: float) -> None:
    """apex overlaps CPU rows at ~1.15 gpu-only steps, neo pipelines them at ~2.3 (two weight passes): objectives a
    little above those leave room for CPU rows, which must then never be predicted past them."""
    tpot_ms = slack * GPU_ONLY_STEP_NS / 1e6
    records, _ = run(policy, tpot_ms)
    hybrid = [r for r in records if r.cpu_rows]
    assert hybrid, "the objective leaves room for CPU rows"
    assert max(r.predicted_ns for r in hybrid) <= tpot_ms * 1e6


def test_cpu_requests_take_their_turns_within_the_tpot_objective() -> None:
    """Without an objective neo lets a CPU request go 5 iterations without a token (2 CPU rows a sub-batch, more
    requests than that); under 2.5 gpu-only steps (~1.1 pipelined steps) a request that has sat out one iteration
    would break it by sitting out another, so it runs: at most 2 iterations between tokens."""
    _, free = run("neo", 0.0)
    _, bound = run("neo", 2.5 * GPU_ONLY_STEP_NS / 1e6)
    assert bound <= 2 < free


@pytest.mark.parametrize("policy", ["apex", "neo"])
def test_under_an_objective_a_record_carries_the_prediction_its_plan_was_decided_by(policy: str) -> None:
    """As the engine loop runs: the step before is fitted between a plan and its step's output (Scheduler.refine),
    the steps measured 10% to 50% over the tables so that every fit moves the model; the prediction the record
    carries is still the one the policy held to the objective."""
    s = Scheduler(SchedulerConfig(policy=policy, tpot_slo_ms=2.5 * GPU_ONLY_STEP_NS / 1e6),
                  worker(gpu_blocks=32, cpu_blocks=2000, cpu_max_rows=2), ConstantCostModel(COSTS, MODEL))
    for i in range(12):
        s.add_request(f"r{i}", [5] * 20, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    compared = 0
    while s.has_work():
        plan = s.schedule()
        s.refine()
        flight = s.in_flight
        estimate_ns = flight.choice.estimate_ns
        ratio = 1.1 + 0.4 * (plan.step_id % 2)
        measured = int(ratio * s.cost_model.predict_raw(flight.shape).total_ns) if flight.shape else 1_000_000
        output = StepOutput(plan.step_id, {r.request_id: 7 for r in flight.sampling()}, StepTimings(total_ns=measured))
        record = s.update_from_output(plan, output, fit_later=True).record
        if record is not None:
            assert record.predicted_ns == estimate_ns, f"step {plan.step_id}"
            compared += 1
    assert compared > 20 and s.cost_model.num_observed > 20
