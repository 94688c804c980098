"""The gpu_worker's order of steps (gpu_worker.servicer's Turns and StepLine): a step sent after another runs after
it whichever call arrives first, a step queued behind another starts as soon as it ends, a plan made ahead of a step
that failed is refused, a call cancelled before its turn does not run, a step whose predecessor never comes is
refused rather than left waiting, and a step on an empty line runs on the caller's thread."""

import asyncio
import threading
import time

import pytest

from apex_serve import errors
from apex_serve.types import StepOutput, StepPlan
from gpu_worker.servicer import StepLine, Turns, in_turn


class Worker:
    """Runs plans on a StepLine in the order of their turns, recording when each starts and ends."""

    def __init__(self, step_s: float = 0.0, failing: frozenset[int] = frozenset()) -> None:
        self.turns, self.line = Turns(), StepLine()
        self.step_s, self.failing = step_s, failing
        self.ran: list[int] = []
        self.times: dict[int, tuple[float, float]] = {}

    def _execute(self, plan: StepPlan) -> StepOutput:
        start = time.perf_counter()
        time.sleep(self.step_s)
        if plan.step_id in self.failing:
            raise ConnectionError("the step failed")
        self.ran.append(plan.step_id)
        self.times[plan.step_id] = (start, time.perf_counter())
        return StepOutput(plan.step_id)

    async def call(self, plan: StepPlan, after: int | None = None, delay_s: float = 0.0) -> StepOutput:
        await asyncio.sleep(delay_s)
        if after is None:
            self.turns.take(plan.step_id)
        else:
            await self.turns.take_after(after, plan.step_id)
        return await self.line.run(lambda ran: (self._execute(in_turn(plan, ran)), True))


async def test_a_step_that_arrives_before_the_one_it_follows_runs_after_it() -> None:
    worker = Worker(step_s=0.01)
    second = asyncio.create_task(worker.call(StepPlan(8, planned_ahead=True), 7))  # reaches the worker first
    first = asyncio.create_task(worker.call(StepPlan(7), delay_s=0.02))
    assert [(await first).step_id, (await second).step_id] == [7, 8]
    assert worker.ran == [7, 8]


async def test_a_step_queued_behind_another_starts_as_soon_as_it_ends_whatever_the_event_loop_does() -> None:
    worker = Worker(step_s=0.02)
    first = asyncio.create_task(worker.call(StepPlan(0)))
    second = asyncio.create_task(worker.call(StepPlan(1, planned_ahead=True), 0))
    await asyncio.sleep(0.005)
    time.sleep(0.03)  # the event loop is busy past the end of step 0: step 1 does not wait for it
    await asyncio.gather(first, second)
    gap_s = worker.times[1][0] - worker.times[0][1]
    assert gap_s < 0.005, f"step 1 started {gap_s * 1e3:.1f} ms after step 0 ended"


async def test_a_plan_made_ahead_of_a_failed_step_is_refused_and_one_made_after_it_runs() -> None:
    worker = Worker(failing=frozenset({0}))
    failing = asyncio.create_task(worker.call(StepPlan(0)))
    ahead = asyncio.create_task(worker.call(StepPlan(1, planned_ahead=True), 0))
    with pytest.raises(ConnectionError):
        await failing
    with pytest.raises(errors.StepRefused, match="planned ahead of a step that failed"):
        await ahead
    assert (await worker.call(StepPlan(2))).step_id == 2  # planned once the failure was known
    assert worker.ran == [2]


async def test_a_call_cancelled_before_its_turn_does_not_run_and_a_plan_made_ahead_of_it_is_refused() -> None:
    worker = Worker(step_s=0.03)
    running = asyncio.create_task(worker.call(StepPlan(0)))
    cancelled = asyncio.create_task(worker.call(StepPlan(1, planned_ahead=True), 0))
    ahead = asyncio.create_task(worker.call(StepPlan(2, planned_ahead=True), 1))
    await asyncio.sleep(0.01)  # all three on the line, step 0 running
    cancelled.cancel()
    await running
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(errors.StepRefused):
        await ahead
    assert worker.ran == [0]


async def test_a_step_sent_after_one_that_never_comes_is_refused() -> None:
    with pytest.raises(errors.StepRefused, match="did not come"):
        await Turns().take_after(3, 4, timeout_s=0.05)


async def test_a_call_on_an_empty_line_runs_on_the_callers_thread_and_one_behind_another_waits_on_the_line() -> None:
    line, ran = StepLine(), []

    def work(name: str, sleep_s: float = 0.0) -> tuple[int, bool]:
        time.sleep(sleep_s)
        ran.append(name)
        return threading.get_ident(), True

    assert await line.run_here(lambda _: work("alone")) == threading.get_ident()
    long_call = line.put(lambda _: work("long", 0.05))
    behind = await line.run_here(lambda _: work("behind"))
    assert behind != threading.get_ident() and behind == await long_call
    assert ran == ["alone", "long", "behind"]
    assert await line.run_here(lambda _: work("alone again")) == threading.get_ident()
