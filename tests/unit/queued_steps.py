"""submit() for fake workers, as the gpu_worker answers it (gpu_worker.servicer's Turns and StepLine): steps run one
at a time in the order of their turns, and a plan made ahead of a step that did not run is refused
(errors.StepRefused)."""

import asyncio
from collections.abc import Awaitable, Callable

from apex_serve.types import StepOutput, StepPlan
from gpu_worker.servicer import StepLine, Turns, in_turn

STEP_TIMEOUT_S = 60.0  # the longest a fake's step may take (a step thread never waits for a loop that is gone)


class QueuedSteps:
    """Mixed into a fake whose step(plan) is a coroutine function (a method or an attribute): the line's thread runs
    each step on the event loop and waits for it."""

    step: Callable[[StepPlan], Awaitable[StepOutput]]
    _turns: Turns | None = None
    _line: StepLine | None = None

    def submit(self, plan: StepPlan, after_step_id: int | None = None) -> "asyncio.Task[StepOutput]":
        if self._turns is None:
            self._turns, self._line = Turns(), StepLine()
        return asyncio.create_task(self._in_turn(plan, after_step_id))

    async def _in_turn(self, plan: StepPlan, after_step_id: int | None) -> StepOutput:
        if after_step_id is None:
            self._turns.take(plan.step_id)
        else:
            await self._turns.take_after(after_step_id, plan.step_id)
        loop = asyncio.get_running_loop()

        def run(ran: bool) -> tuple[StepOutput, bool]:
            step = asyncio.run_coroutine_threadsafe(self.step(in_turn(plan, ran)), loop)
            return step.result(STEP_TIMEOUT_S), True

        return await self._line.run(run)
