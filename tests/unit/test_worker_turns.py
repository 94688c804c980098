"""The gpu_worker's order of steps (gpu_worker.servicer.Turns): a step sent after another runs after it whichever call
arrives first, a plan made ahead of a step that failed is refused, and a step whose predecessor never comes is
refused rather than left waiting."""

import asyncio

import pytest

from apex_serve import errors
from apex_serve.types import StepOutput, StepPlan
from gpu_worker.servicer import Turns, step_in_turn


async def test_a_step_that_arrives_before_the_one_it_follows_runs_after_it() -> None:
    turns, ran = Turns(), []

    async def execute(plan: StepPlan) -> StepOutput:
        ran.append(plan.step_id)
        await asyncio.sleep(0.01)
        return StepOutput(plan.step_id)

    async def call(plan: StepPlan, after: int | None, delay_s: float) -> StepOutput:
        await asyncio.sleep(delay_s)
        previous, turn = turns.take(plan.step_id) if after is None else await turns.take_after(after, plan.step_id)
        return await step_in_turn(previous, turn, plan, execute)

    second = asyncio.create_task(call(StepPlan(8, planned_ahead=True), 7, 0.0))  # reaches the worker first
    first = asyncio.create_task(call(StepPlan(7), None, 0.02))
    assert [(await first).step_id, (await second).step_id] == [7, 8]
    assert ran == [7, 8]


async def test_a_plan_made_ahead_of_a_failed_step_is_refused_and_one_made_after_it_runs() -> None:
    turns = Turns()

    async def fail(plan: StepPlan) -> StepOutput:
        raise ConnectionError("the step failed")

    async def ok(plan: StepPlan) -> StepOutput:
        return StepOutput(plan.step_id)

    previous, turn = turns.take(0)
    failing = asyncio.create_task(step_in_turn(previous, turn, StepPlan(0), fail))
    previous, turn = await turns.take_after(0, 1)
    ahead = asyncio.create_task(step_in_turn(previous, turn, StepPlan(1, planned_ahead=True), ok))
    with pytest.raises(ConnectionError):
        await failing
    with pytest.raises(errors.StepRefused, match="planned ahead of a step that failed"):
        await ahead
    previous, turn = turns.take(2)  # planned once the failure was known
    assert (await step_in_turn(previous, turn, StepPlan(2), ok)).step_id == 2


async def test_a_step_sent_after_one_that_never_comes_is_refused() -> None:
    with pytest.raises(errors.StepRefused, match="did not come"):
        await Turns().take_after(3, 4, timeout_s=0.05)
