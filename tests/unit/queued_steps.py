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

    async def submit(self, plan: StepPlan) -> "asyncio.Task[StepOutput]":
        if self._turns is None:
            self._turns = Turns()
        previous, turn = self._turns.take()
        return asyncio.create_task(step_in_turn(previous, turn, plan, self.step))
