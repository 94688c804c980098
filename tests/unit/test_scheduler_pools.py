"""The scheduler core on fabricated step results, for every policy: after any sequence of admissions, growth, swaps,
preemptions, aborts and finishes no block leaks or is held twice; no CPU request sits out more than max_sit_out
iterations; plans carry deltas; the iteration record reports the step."""

import random
from collections import defaultdict
from dataclasses import replace

import pytest

from apex_serve.types import ExecutionMode, Placement, SamplingParams, StepOutput, StepPlan, StepTimings, WorkerInfo
from apex_tools.sim.variants import NEO_SWAP_IN_OCCUPANCY, UNBOUNDED_SIT_OUT, NeoAsPublished
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.loader import load_cost_model
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.cost.shape import ModelShape
from scheduler_service.in_flight import StepResult
from scheduler_service.request import RequestStatus
from scheduler_service.scheduler import Scheduler

MODEL = ModelShape(num_layers=4, hidden_size=256, intermediate_size=512, num_q_heads=8, num_kv_heads=2, head_dim=32,
                   vocab_size=1000)
COSTS = ConstantCosts(lin_ns=1_000_000.0, lin_ns_per_token=1_000.0, pref_ns_per_token=100.0,
                      gatt_ns_per_kv_token=10.0, catt_ns_per_kv_token=50.0, sync_ns=1_000.0, step_ns=100_000.0)
POLICIES = ("gpu-only", "neo", "apex")


def worker(gpu_blocks: int = 40, cpu_blocks: int = 400, cpu_max_rows: int = 4,
           decode_attention: str = "") -> WorkerInfo:
    return WorkerInfo(model_name="m", num_layers=4, vocab_size=1000, max_model_len=512, eos_token_ids=(2,),
                      block_size=4, num_kv_blocks=gpu_blocks, device="sim", dtype="float32",
                      num_cpu_kv_blocks=cpu_blocks, cpu_max_rows=cpu_max_rows, decode_attention=decode_attention)


def scheduler(policy: str, max_sit_out: int = 3, max_num_seqs: int = 32, **pools: int | str) -> Scheduler:
    """policy: of POLICIES, or neo-published (the simulator's NEO as its code runs, injected)."""
    cost_model = ConstantCostModel(COSTS, MODEL) if policy != "gpu-only" else None
    if policy == "neo-published":
        config = SchedulerConfig(policy="neo", max_num_seqs=max_num_seqs, max_sit_out=UNBOUNDED_SIT_OUT)
        return Scheduler(config, worker(**pools), cost_model, policy=NeoAsPublished(cost_model))
    return Scheduler(SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_sit_out=max_sit_out),
                     worker(**pools), cost_model)


def check_blocks(s: Scheduler) -> None:
    """Every block is free or held by exactly one running request, in the pool the request lives in."""
    held: dict[Placement, list[int]] = defaultdict(list)
    for request in s.running:
        assert request.status is RequestStatus.RUNNING
        assert len(request.block_ids) >= s._kv.blocks_for(request.kv_len), request.request_id
        held[request.placement] += request.block_ids
    for request in s._waiting:
        assert request.block_ids == []
    stats = s.stats()
    for placement in Placement:
        ids = held[placement]
        assert len(ids) == len(set(ids)), f"a {placement.value} block is held twice"
        free, total = stats.free_blocks[placement], stats.total_blocks[placement]
        assert len(ids) + free == total, f"{placement.value} blocks leaked"


def step(s: Scheduler, plan: StepPlan, rng: random.Random, fit_later: bool = False) -> StepResult:
    ids = [r.request_id for r in s.in_flight.sampling()]  # a prefill chunk short of its request's end samples nothing
    sampled = {rid: (2 if rng.random() < 0.03 else 7) for rid in ids}  # token 2 is EOS
    prediction = s.in_flight.prediction()
    measured = 1_000_000 if prediction is None else int(prediction.total_ns * 1.1)  # the tables 10% optimistic
    return s.update_from_output(plan, StepOutput(plan.step_id, sampled, StepTimings(total_ns=measured)), fit_later)


@pytest.mark.parametrize("policy", (*POLICIES, "neo-published"))
@pytest.mark.parametrize("seed", range(4))
def test_random_admit_grow_swap_preempt_abort_finish_leaks_no_block(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    s = scheduler(policy, gpu_blocks=30, cpu_blocks=120)
    count = 0
    saw = defaultdict(int)
    for _ in range(400):
        for _ in range(rng.choice((0, 0, 1, 2))):
            s.add_request(f"r{count}", [5] * rng.randint(1, 40),
                          SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 60)))
            count += 1
        if s._requests and rng.random() < 0.05:
            s.abort(rng.choice(list(s._requests)))
        plan = s.schedule()
        check_blocks(s)
        saw["swaps"] += len(plan.swap_out) + len(plan.swap_in)
        saw[plan.mode] += 1
        if rng.random() < 0.03 and s.in_flight.requests:  # an abort while the step runs: its token is dropped
            s.abort(rng.choice(s.in_flight.requests).request_id)
        step(s, plan, rng)
        check_blocks(s)
    for request_id in list(s._requests):
        s.abort(request_id)
    plan = s.schedule()
    stats = s.stats()
    assert plan.is_empty and stats.num_running == stats.num_waiting == 0
    for placement in Placement:
        assert stats.free_blocks[placement] == stats.total_blocks[placement]
    assert stats.num_preemptions > 0 or saw["swaps"] > 0, "the pools were never under pressure"
    if policy == "apex":  # CPU rows pay here for apex (neo's second weight pass costs more than they yield)
        assert saw["swaps"] > 0


@pytest.mark.parametrize("seed", range(3))
def test_neo_as_published_swaps_in_while_requests_wait_up_to_95_percent_of_the_accelerator_pool(seed: int) -> None:
    rng = random.Random(seed)
    s = scheduler("neo-published", gpu_blocks=40, cpu_blocks=2000, cpu_max_rows=8)
    total = s.stats().total_blocks[Placement.GPU]
    swapped_in_while_waiting = 0
    for i in range(300):
        for _ in range(rng.choice((0, 1, 3))):
            s.add_request(f"r{i}-{rng.random()}", [5] * rng.randint(1, 30),
                          SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 50)))
        waiting, used = s.stats().num_waiting, total - s.stats().free_blocks[Placement.GPU]
        plan = s.schedule()
        if plan.swap_in:  # the swap-ins come first in a plan: their blocks on top of those held before it
            assert used + sum(len(swap.block_ids) for swap in plan.swap_in) <= round(total * NEO_SWAP_IN_OCCUPANCY)
            swapped_in_while_waiting += waiting > 0
        check_blocks(s)
        step(s, plan, rng)
    assert swapped_in_while_waiting > 0, "no request was swapped in while others waited"


@pytest.mark.parametrize("policy", ("apex", "neo"))
@pytest.mark.parametrize("seed", range(3))
def test_cpu_requests_that_sat_out_are_swapped_in_ahead_of_the_waiting_requests(policy: str, seed: int) -> None:
    """While a CPU request sits out (the policy gave it no row), CPU requests take the accelerator's free blocks before
    a waiting request is admitted (as vLLM resumes swapped requests before new prefills); while requests wait and none
    sits out, none moves."""
    rng = random.Random(seed)
    s = scheduler(policy, gpu_blocks=40, cpu_blocks=2000, cpu_max_rows=8)
    swapped_in_while_waiting = 0
    for i in range(300):
        for _ in range(rng.choice((0, 1, 3))):
            s.add_request(f"r{i}-{rng.random()}", [5] * rng.randint(1, 30),
                          SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 50)))
        waiting, sat_out = s.stats().num_waiting, {r.request_id: s._sat_out(r) for r in s._cpu_queue}
        plan = s.schedule()
        assert not plan.swap_in or max(sat_out.values()) > 0 or not waiting
        swapped_in_while_waiting += bool(plan.swap_in) and waiting > 0
        check_blocks(s)
        step(s, plan, rng)
    assert swapped_in_while_waiting > 0, "no CPU request was swapped in while others waited"


@pytest.mark.parametrize("kernel", ("sdpa", "flashinfer"))
def test_while_nothing_waits_cpu_requests_move_to_free_accelerator_room_unless_they_lengthen_its_padded_attention(
        kernel: str) -> None:
    """CPU requests that decode every step (none sits out) move to the accelerator's free room once nothing waits:
    under the paged kernel, and under the padded one only where no accelerator row is shorter than them (a longer
    row would lengthen every row's attention)."""
    s = scheduler("apex", gpu_blocks=12, cpu_blocks=400, cpu_max_rows=8, decode_attention=kernel)
    sampling = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i in range(6):
        s.add_request(f"r{i}", [5] * 10, sampling)
    rng = random.Random(0)
    step(s, s.schedule(), rng)
    on_cpu = {r.request_id for r in s._cpu_queue}
    assert on_cpu and len(on_cpu) < 6
    for request in list(s._gpu_running):
        s.abort(request.request_id)
    s.add_request("short", [5] * 2, sampling)  # admitted while it waits: no CPU request moves in its step
    plan = s.schedule()
    assert not plan.swap_in and [r.request_id for r in plan.new_requests] == ["short"]
    step(s, plan, rng)
    assert s.stats().num_waiting == 0 and [r.request_id for r in s._gpu_running] == ["short"]
    assert all(s._sat_out(r) == 0 for r in s._cpu_queue)  # every CPU request decoded in the last step
    plan = s.schedule()
    moved = {swap.request_id for swap in plan.swap_in}
    if kernel == "flashinfer":
        assert moved and moved <= on_cpu
    else:
        assert not moved  # each CPU request's context is longer than the accelerator's one row
    check_blocks(s)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_running_requests_on_both_pools_never_exceed_max_num_seqs(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    s = scheduler(policy, max_num_seqs=6, gpu_blocks=20, cpu_blocks=2000, cpu_max_rows=8)
    cpu_placed = 0
    for i in range(300):
        for _ in range(rng.choice((0, 1, 3, 8))):
            s.add_request(f"r{i}-{rng.random()}", [5] * rng.randint(1, 30),
                          SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 50)))
        plan = s.schedule()
        cpu_placed += sum(r.placement is Placement.CPU for r in plan.new_requests)
        assert len(s.running) <= 6 and s.stats().num_running <= 6
        assert len(plan.new_requests) + len(plan.cached_requests) <= 6
        step(s, plan, rng)
        assert len(s.running) <= 6
    if policy != "gpu-only":
        assert cpu_placed > 0, "nothing was placed on the CPU"


@pytest.mark.parametrize("policy", ("neo", "apex"))
@pytest.mark.parametrize("cpu_turns_slow", (False, True))
def test_no_cpu_request_sits_out_more_than_max_sit_out_iterations(policy: str, cpu_turns_slow: bool) -> None:
    s = scheduler(policy, max_sit_out=2, gpu_blocks=8, cpu_blocks=2000, cpu_max_rows=2)
    for i in range(12):
        s.add_request(f"r{i}", [5] * 20, SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True))
    last_run: dict[str, int] = {}
    rng = random.Random(0)
    iteration = 0
    while s.has_work():
        if cpu_turns_slow and iteration == 10:  # CPU rows admitted while cheap stop paying: they must still run
            s.cost_model.costs = replace(COSTS, catt_ns_per_kv_token=1e7)
        plan = s.schedule()
        for entry in (*plan.new_requests, *plan.cached_requests):
            last_run[entry.request_id] = iteration
        for request in s.running:
            if request.request_id in last_run:
                gap = iteration - last_run[request.request_id]
                assert gap <= s.config.max_sit_out, f"{request.request_id} sat out {gap} iterations"
        step(s, plan, rng)
        iteration += 1
    assert len(last_run) == 12


def test_cpu_requests_decode_while_the_accelerator_pool_is_full_under_hybrid_policies() -> None:
    s = scheduler("apex", gpu_blocks=12, cpu_blocks=400, cpu_max_rows=8)
    for i in range(6):
        s.add_request(f"r{i}", [5] * 10, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    plan = s.schedule()
    placements = {r.request_id: r.placement for r in plan.new_requests}
    assert Placement.CPU in placements.values() and Placement.GPU in placements.values()
    step(s, plan, random.Random(0))
    plan = s.schedule()
    assert plan.mode is ExecutionMode.ASYNC_OVERLAP
    assert len(plan.cached_requests) == 6
    record = s.stats().last_iteration
    assert record is not None and record.cpu_rows == sum(p is Placement.CPU for p in placements.values())
    assert s.in_flight.record is record
    predicted = s.in_flight.prediction().total_ns
    record = step(s, plan, random.Random(0)).record
    assert record is not None and record.predicted_ns == predicted
    assert record.measured_ns == int(record.predicted_ns * 1.1)
    assert record.relative_error == pytest.approx(1 / 1.1 - 1, abs=1e-6)


def test_gpu_only_policy_keeps_every_request_on_the_accelerator_and_preempts_when_full() -> None:
    s = scheduler("gpu-only", gpu_blocks=12)
    for i in range(6):
        s.add_request(f"r{i}", [5] * 10, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    rng = random.Random(0)
    while s.has_work():
        plan = s.schedule()
        assert plan.mode is ExecutionMode.GPU_ONLY and not plan.swap_out and not plan.swap_in
        assert all(r.placement is Placement.GPU for r in plan.new_requests)
        step(s, plan, rng)
    assert s.stats().num_preemptions > 0


def test_an_unchanged_decode_entry_is_the_same_object_from_step_to_step() -> None:
    s = scheduler("gpu-only", gpu_blocks=40)
    s.add_request("a", [5] * 3, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    rng = random.Random(0)
    step(s, s.schedule(), rng)  # prefill: 3 tokens in 1 block of 4
    first = s.schedule()  # decodes position 3: still block 0
    step(s, first, rng)
    second = s.schedule()  # position 4 needs a new block
    step(s, second, rng)
    third = s.schedule()
    assert first.cached_requests[0].new_block_ids == () and len(second.cached_requests[0].new_block_ids) == 1
    assert third.cached_requests[0] is first.cached_requests[0]


def test_hybrid_policy_without_a_cpu_worker_is_refused_naming_the_policy() -> None:
    with pytest.raises(ValueError, match="^policy: 'neo' places requests on the CPU"):
        Scheduler(SchedulerConfig(policy="neo"), worker(cpu_blocks=0), ConstantCostModel(COSTS, MODEL))


async def test_the_service_refuses_a_hybrid_policy_without_a_profiler_and_runs_gpu_only_without_one() -> None:
    with pytest.raises(ValueError, match="^profiler_address: policy 'apex'"):
        await load_cost_model(SchedulerConfig(policy="apex"), worker())
    assert await load_cost_model(SchedulerConfig(policy="gpu-only"), worker()) is None


@pytest.mark.parametrize("policy", ("neo", "apex"))
def test_a_fit_left_for_refine_corrects_the_cost_model_as_one_made_with_the_update(policy: str) -> None:
    at_once, later = scheduler(policy), scheduler(policy)
    rngs = random.Random(3), random.Random(3)
    for s in (at_once, later):
        for i in range(10):
            s.add_request(f"r{i}", [5] * 30, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(30):
        plan = at_once.schedule()
        assert later.schedule() == plan
        step(at_once, plan, rngs[0])
        observed = later.cost_model.num_observed
        step(later, plan, rngs[1], fit_later=True)
        assert later.cost_model.num_observed == observed, "the fit was made in update_from_output"
        later.refine()
        assert later.cost_model.num_observed == at_once.cost_model.num_observed
    assert later.cost_model.factors == at_once.cost_model.factors
    assert later.cost_model.error_stats() == at_once.cost_model.error_stats()
    assert later.stats().recent_iterations == at_once.stats().recent_iterations
    assert at_once.cost_model.num_observed >= 25
