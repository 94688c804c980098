"""The scheduler when the gpu_worker loses its CPU pool in a step (errors.CpuPoolLost): the requests of the CPU pool are
recomputed on the accelerator and every request still yields exactly the tokens of an undisturbed run; the retry runs
the failed step's accelerator part and nothing else; nothing is placed on the CPU until the pool is restored, then
hybrid iterations resume; no block leaks; a step's CPU rows get a deadline from its prediction, clamped."""

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from fake_hybrid_worker import HybridWorker, Loss
from test_scheduler_pools import COSTS, MODEL, check_blocks, worker

from apex_serve.engine_stats import SchedulerStats
from apex_serve.errors import CpuPoolLost
from apex_serve.types import ExecutionMode, FinishReason, Placement, SamplingParams, StepPlan
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ConstantCostModel
from scheduler_service.cpu_pool import cpu_deadline_s
from scheduler_service.scheduler import Scheduler

Arrivals = dict[int, list[tuple[str, int, int]]]  # iteration -> (request id, prompt tokens, max_tokens)
# a request every other iteration: the accelerator pool (12 blocks of 4) fills and hybrid steps follow, with CPU
# admissions, accelerator admissions beside CPU rows, and swap-outs
ARRIVALS: Arrivals = {2 * i: [(f"r{i:02d}", 6 + (i * 5) % 13, 12 + (i * 7) % 20)] for i in range(14)}


def make(policy: str = "apex", gpu_blocks: int = 12, cpu_blocks: int = 400, cpu_max_rows: int = 4,
         **config: float) -> Scheduler:
    return Scheduler(SchedulerConfig(policy=policy, max_sit_out=3, **config),  # type: ignore[arg-type]
                     worker(gpu_blocks, cpu_blocks, cpu_max_rows), ConstantCostModel(COSTS, MODEL))


def once(condition: Callable[[StepPlan], bool]) -> Callable[[StepPlan], bool]:
    """True for the first plan that meets the condition, false ever after."""
    fired = []

    def first(plan: StepPlan) -> bool:
        if fired or not condition(plan):
            return False
        fired.append(plan)
        return True

    return first


def cpu_admission(plan: StepPlan) -> bool:
    return any(n.placement is Placement.CPU for n in plan.new_requests)


def accelerator_admission_and_growth(plan: StepPlan) -> bool:
    return any(n.placement is Placement.GPU for n in plan.new_requests) and any(
        c.new_block_ids for c in plan.cached_requests)


@dataclass
class Retry:
    """A loss as the scheduler answered it: the retry plan, the requests in flight with it and those waiting, the
    stats then."""

    plan: StepPlan
    in_flight: list[str]
    waiting: list[str]
    stats: SchedulerStats


@dataclass
class Driver:
    """Runs arrivals on the fake worker to the end; a plan that loses the CPU pool is followed by the scheduler's
    retry, and the pool comes back restore_after iterations later (never with None)."""

    scheduler: Scheduler
    worker: HybridWorker
    arrivals: Arrivals
    restore_after: int | None = None
    restore_changes: dict[str, object] = field(default_factory=dict)
    ignore_eos: bool = True
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    reasons: dict[str, FinishReason | None] = field(default_factory=dict)
    ran: list[StepPlan] = field(default_factory=list)  # plans whose step returned
    retries: list[Retry] = field(default_factory=list)
    restored_at: list[int] = field(default_factory=list)  # len(ran) when the pool came back

    def run(self) -> "Driver":
        s, w = self.scheduler, self.worker
        iteration, restore_at = 0, None
        while s.has_work() or iteration <= max(self.arrivals, default=0):
            for request_id, prompt, max_tokens in self.arrivals.get(iteration, ()):
                s.add_request(request_id, [5] * prompt,
                              SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=self.ignore_eos))
            if iteration == restore_at:
                w.reattach(**self.restore_changes)
                s.cpu_pool_restored(w.info_now)
                self.restored_at.append(len(self.ran))
            plan = s.schedule()
            check_blocks(s)
            try:
                output = w.execute(plan)
            except CpuPoolLost:
                plan = s.cpu_pool_lost(plan)
                check_blocks(s)
                self.retries.append(Retry(plan, [r.request_id for r in s.in_flight.requests],
                                          [r.request_id for r in s._waiting], s.stats()))
                output = w.execute(plan)
                if self.restore_after is not None:
                    restore_at = iteration + self.restore_after
            self.ran.append(plan)
            for out in s.update_from_output(plan, output).outputs:
                self.tokens[out.request_id] += out.new_token_ids
                if out.finished:
                    self.reasons[out.request_id] = out.finish_reason
            check_blocks(s)
            iteration += 1
        return self


def assert_all_free(s: Scheduler, w: HybridWorker) -> None:
    stats = s.stats()
    assert stats.num_running == stats.num_waiting == 0
    for placement in Placement:
        assert stats.free_blocks[placement] == stats.total_blocks[placement], f"{placement.value} blocks leaked"
    assert not w.held, f"the worker still holds {sorted(w.held)}"


@pytest.mark.parametrize("policy", ["apex", "neo"])
@pytest.mark.parametrize("lose_in", [cpu_admission, accelerator_admission_and_growth, lambda plan: bool(plan.swap_out)],
                         ids=["cpu-admission", "accelerator-admission", "swap-out"])
def test_requests_of_a_lost_cpu_pool_are_recomputed_and_yield_the_tokens_of_an_undisturbed_run(
        policy: str, lose_in: Callable[[StepPlan], bool]) -> None:
    undisturbed = Driver(make(policy), HybridWorker(make(policy).worker_info), ARRIVALS).run()
    s = make(policy)
    w = HybridWorker(s.worker_info, once(lose_in))
    run = Driver(s, w, ARRIVALS, restore_after=5).run()
    assert len(w.losses) == 1, "the workload has no such step"
    assert w.losses[0].requeued, "the lost pool held no request"
    assert dict(run.tokens) == dict(undisturbed.tokens)
    expected = {rid: max_tokens for arrivals in ARRIVALS.values() for rid, _, max_tokens in arrivals}
    assert {rid: len(tokens) for rid, tokens in run.tokens.items()} == expected
    assert set(run.reasons.values()) == {FinishReason.LENGTH}
    assert_all_free(s, w)


def test_the_retry_runs_exactly_the_failed_steps_accelerator_part_in_a_gpu_only_step() -> None:
    s = make()
    w = HybridWorker(s.worker_info, once(accelerator_admission_and_growth))
    run = Driver(s, w, ARRIVALS).run()
    loss: Loss = w.losses[0]
    failed, retry = loss.plan, run.retries[0].plan
    assert failed.mode is not ExecutionMode.GPU_ONLY
    assert retry.step_id == failed.step_id + 1 and retry.mode is ExecutionMode.GPU_ONLY
    assert not retry.swap_in and not retry.swap_out and retry.cpu_wait_timeout_s == 0.0
    gpu_admitted = tuple(n for n in failed.new_requests if n.placement is Placement.GPU)
    assert gpu_admitted and retry.new_requests == gpu_admitted
    kept_rows = tuple(c for c in failed.cached_requests if c.request_id in loss.kept)
    assert any(c.new_block_ids for c in kept_rows), "the failed step grew no accelerator row"
    assert retry.cached_requests == kept_rows  # the same block growth, sent again
    assert all(r.sub_batch == 0 for r in (*retry.new_requests, *retry.cached_requests))
    assert set(retry.freed_request_ids) == loss.requeued
    assert run.retries[0].in_flight == [r.request_id for r in (*retry.new_requests, *retry.cached_requests)]


def test_the_retry_is_recorded_as_a_gpu_only_iteration_and_the_failed_step_not_at_all() -> None:
    s = make()
    w = HybridWorker(s.worker_info, once(cpu_admission))
    run = Driver(s, w, ARRIVALS).run()
    retry = run.retries[0]
    record = retry.stats.last_iteration
    assert record is not None and record.step_id == retry.plan.step_id and record.mode is ExecutionMode.GPU_ONLY
    assert record.cpu_rows == 0 and record.swaps_in == record.swaps_out == 0
    assert record.preemptions >= len(w.losses[0].requeued)
    stats = s.stats()
    ran = [p for p in run.ran if not p.is_empty]
    modes = {mode: sum(p.mode is mode for p in ran) for mode in ExecutionMode}
    assert stats.iterations_by_mode == {mode: n for mode, n in modes.items() if n}
    assert w.losses[0].plan.step_id not in {r.step_id for r in stats.recent_iterations}


def test_while_degraded_only_the_accelerator_serves_and_once_restored_the_cpu_pool_is_used_again() -> None:
    s = make()
    w = HybridWorker(s.worker_info, once(cpu_admission))
    run = Driver(s, w, ARRIVALS, restore_after=4, restore_changes={"num_cpu_kv_blocks": 300}).run()
    degraded = run.retries[0].stats
    assert degraded.cpu_pool_degraded and degraded.cpu_pool_losses == 1
    assert degraded.num_running_cpu == 0 and degraded.total_blocks[Placement.CPU] == 0
    lost_at = run.ran.index(run.retries[0].plan)
    back_at = run.restored_at[0]
    for plan in run.ran[lost_at:back_at]:
        assert plan.mode is ExecutionMode.GPU_ONLY and not plan.swap_in and not plan.swap_out
        assert all(n.placement is Placement.GPU for n in plan.new_requests)
    after = run.ran[back_at:]
    assert any(p.mode is not ExecutionMode.GPU_ONLY for p in after), "no hybrid iteration after the restore"
    assert any(n.placement is Placement.CPU for p in after for n in p.new_requests), "nothing placed on the CPU"
    stats = s.stats()
    assert not stats.cpu_pool_degraded and stats.cpu_pool_losses == 1
    assert stats.total_blocks[Placement.CPU] == 300
    assert_all_free(s, w)


def test_requeued_requests_wait_in_their_order_of_arrival_among_the_waiting() -> None:
    s = make()
    w = HybridWorker(s.worker_info, once(lambda plan: plan.step_id >= 20))  # r06 waits, r05 and r07 are on the CPU
    run = Driver(s, w, ARRIVALS).run()
    waiting, requeued = run.retries[0].waiting, w.losses[0].requeued
    assert requeued < set(waiting)
    assert min(set(waiting) - requeued) < max(requeued), "no request that waited arrived before a requeued one"
    assert waiting == sorted(waiting)  # the ids are in the order of arrival


def test_a_request_that_fits_only_the_cpu_pool_waits_while_degraded_and_lets_the_others_pass() -> None:
    s = make(gpu_blocks=8)  # 32 tokens on the accelerator
    w = HybridWorker(s.worker_info, once(cpu_admission))
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    s.add_request("cpu", [5] * 40, greedy)
    plan = s.schedule()
    with pytest.raises(CpuPoolLost):
        w.execute(plan)
    retry = s.cpu_pool_lost(plan)
    assert retry.is_empty and retry.freed_request_ids == ("cpu",)
    s.update_from_output(retry, w.execute(retry))
    s.add_request("small", [6] * 8, greedy)  # behind it in the queue, fits the accelerator
    finished = set()
    for _ in range(8):
        plan = s.schedule()
        assert "cpu" not in {n.request_id for n in plan.new_requests}
        if not plan.is_empty:
            finished |= {o.request_id for o in s.update_from_output(plan, w.execute(plan)).outputs if o.finished}
    assert finished == {"small"}, "the request behind the one that needs the lost CPU pool was not served"
    assert s.stats().num_waiting == 1
    w.reattach()
    s.cpu_pool_restored(w.info_now)
    plan = s.schedule()
    assert [(n.request_id, n.placement) for n in plan.new_requests] == [("cpu", Placement.CPU)]


@pytest.mark.parametrize(("policy", "seed", "swaps_in"), [("apex", 0, False), ("apex", 1, False), ("neo", 0, False),
                                                        ("neo", 2, True)])
def test_losses_at_random_hybrid_steps_and_at_swap_ins_leak_no_block_and_change_no_token(policy: str, seed: int,
                                                                                         swaps_in: bool) -> None:
    rng = random.Random(seed)
    arrivals: Arrivals = defaultdict(list)
    count = 0
    for iteration in range(150):
        for _ in range(rng.choice((0, 0, 1, 2))):
            arrivals[iteration].append((f"q{count:03d}", rng.randint(1, 40), rng.randint(1, 60)))
            count += 1
    pools = {"gpu_blocks": 30, "cpu_blocks": 120, "cpu_max_rows": 4}
    undisturbed_worker = HybridWorker(make(policy, **pools).worker_info, eos_one_in=30)
    undisturbed = Driver(make(policy, **pools), undisturbed_worker, arrivals, ignore_eos=False).run()
    s = make(policy, **pools)
    chance = random.Random(seed)
    w = HybridWorker(s.worker_info, lambda plan: bool(plan.swap_in) or chance.random() < 0.05, eos_one_in=30)
    run = Driver(s, w, arrivals, restore_after=3, ignore_eos=False).run()
    assert len(w.losses) >= 2
    if swaps_in:
        assert any(loss.plan.swap_in for loss in w.losses), "no swap-in lost the pool"
    assert dict(run.tokens) == dict(undisturbed.tokens)
    assert run.reasons == undisturbed.reasons
    assert_all_free(s, w)


def test_a_step_with_cpu_work_gives_its_cpu_rows_its_estimated_time_times_the_factor_within_the_bounds() -> None:
    def first_hybrid_plan(s: Scheduler) -> StepPlan:
        w = HybridWorker(s.worker_info)
        for i in range(6):
            s.add_request(f"r{i}", [5] * 10, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        while True:
            plan = s.schedule()
            if plan.mode is not ExecutionMode.GPU_ONLY or cpu_admission(plan):
                return plan
            assert plan.cpu_wait_timeout_s == 0.0, "a step without CPU work has a CPU deadline"
            s.update_from_output(plan, w.execute(plan))

    s = make(cpu_deadline_factor=20.0, cpu_deadline_min_s=1e-6, cpu_deadline_max_s=100.0)
    plan = first_hybrid_plan(s)
    estimated_s = s.in_flight.choice.estimate_ns / 1e9
    assert estimated_s > 0
    assert plan.cpu_wait_timeout_s == pytest.approx(20.0 * estimated_s)
    assert first_hybrid_plan(make(cpu_deadline_min_s=50.0, cpu_deadline_max_s=60.0)).cpu_wait_timeout_s == 50.0
    assert first_hybrid_plan(make(cpu_deadline_min_s=1e-6, cpu_deadline_max_s=1e-5)).cpu_wait_timeout_s == 1e-5


def test_without_an_estimate_the_cpu_rows_get_the_longest_deadline() -> None:
    config = SchedulerConfig(cpu_deadline_max_s=12.0)
    assert cpu_deadline_s(config, 0.0) == 12.0


def test_cpu_deadline_bounds_out_of_order_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="^cpu_deadline_min_s, cpu_deadline_max_s"):
        SchedulerConfig(cpu_deadline_min_s=5.0, cpu_deadline_max_s=1.0)
    with pytest.raises(ValueError, match="^cpu_deadline_factor"):
        SchedulerConfig(cpu_deadline_factor=0.0)
