"""submit() for fake workers, as the gpu_worker answers it: steps run one at a time in order of submission, and a plan
made ahead of a step that failed is refused (errors.StepRefused)."""

import asyncio
from collections.abc import Awaitable, Callable

from apex_serve.types import StepOutput, StepPlan
from gpu_worker.servicer import Turns, step_in_turn


class QueuedSteps:
    """Mixed into a fake whose step(plan) is a coroutine function (a method or an attribute)."""

    step: Callable[[StepPlan], Awaitable[StepOutput]]
    _turns: Turns | None = None

    def submit(self, plan: StepPlan, after_step_id: int | None = None) -> "asyncio.Task[StepOutput]":
        if self._turns is None:
            self._turns = Turns()
        return asyncio.create_task(self._in_turn(plan, after_step_id))

    async def _in_turn(self, plan: StepPlan, after_step_id: int | None) -> StepOutput:
        if after_step_id is None:
            previous, turn = self._turns.take(plan.step_id)
        else:
            previous, turn = await self._turns.take_after(after_step_id, plan.step_id)
        return await step_in_turn(previous, turn, plan, self.step)
