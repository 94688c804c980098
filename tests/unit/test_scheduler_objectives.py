"""The scheduler under a TPOT objective, on fabricated step results: the contract the end-to-end test reads from
GetStats (no iteration with CPU rows predicted above the objective, and some still run) and the CPU requests' turns
kept within it (the sit-out rule of scheduler_service.objectives), and where nothing goes to the CPU pool, the
hybrid policies' plans are gpu-only's."""

import pytest

from apex_serve.engine_stats import IterationRecord
from apex_serve.types import ExecutionMode, Placement, SamplingParams, StepOutput, StepPlan, StepTimings
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


def plans_of(policy: str, arrivals: dict[int, list[tuple[int, int]]]) -> list[StepPlan]:
    """Every plan the scheduler makes under policy (apex and neo under both objectives, with a CPU pool; gpu-only
    without a cost model, as the stack runs it) for requests of (prompt, output) tokens arriving before the steps
    keyed, each step measured at 4 ms."""
    hybrid = policy != "gpu-only"
    config = SchedulerConfig(policy=policy, tpot_slo_ms=3 * GPU_ONLY_STEP_NS / 1e6 if hybrid else 0.0,
                             ttft_slo_ms=40.0 if hybrid else 0.0)
    s = Scheduler(config, worker(gpu_blocks=256, cpu_blocks=2000, cpu_max_rows=4),
                  ConstantCostModel(COSTS, MODEL) if hybrid else None)
    plans: list[StepPlan] = []
    step, last_arrival = 0, max(arrivals)
    while step <= last_arrival or s.has_work():
        for n, (prompt, output) in enumerate(arrivals.get(step, [])):
            s.add_request(f"r{step}-{n}", [5] * prompt,
                          SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True))
        step += 1
        if not s.has_work():
            continue
        plan = s.schedule()
        s.refine()
        plans.append(plan)
        sampled = {r.request_id: 7 for r in s.in_flight.sampling()}
        s.update_from_output(plan, StepOutput(plan.step_id, sampled, StepTimings(total_ns=4_000_000)),
                             fit_later=True)
    return plans


@pytest.mark.parametrize("policy", ["apex", "neo"])
def test_where_the_device_pool_holds_every_request_a_hybrid_policy_plans_as_gpu_only_does(policy: str) -> None:
    """Staggered arrivals whose KV the accelerator's pool always holds (at most about 400 of its 1,024 tokens): no
    request goes to the CPU pool, so under its objectives the hybrid policy's plans are gpu-only's, plan for plan
    (bench-goodput's lowest rates, where the latency of the two can differ only by the machine's noise)."""
    arrivals = {0: [(24, 30)], 3: [(40, 20)], 5: [(12, 40), (30, 25)], 19: [(60, 30)], 26: [(16, 12)],
                27: [(48, 36)], 50: [(20, 20)], 90: [(33, 17)]}

    hybrid, gpu_only = plans_of(policy, arrivals), plans_of("gpu-only", arrivals)

    assert len(gpu_only) > 80
    assert all(p.mode is ExecutionMode.GPU_ONLY for p in hybrid)
    assert hybrid == gpu_only
