"""What the engine loop needs of the gpu_worker (scheduler_service.worker_client over gRPC, fakes in tests), and the
ways the worker fails it beyond a failed step."""

import asyncio
from typing import Protocol

from apex_serve import errors
from apex_serve.types import StepOutput, StepPlan, WorkerInfo


class GpuWorkerLost(errors.Unavailable):
    """The gpu_worker stopped answering (its process is gone): the state of every request there is lost with it."""


class WorkerReplaced(errors.FailedPrecondition):
    """The gpu_worker came back with another model or other pools than the scheduler was started for: the scheduler
    must start anew against it."""


class WorkerPort(Protocol):
    async def step(self, plan: StepPlan) -> StepOutput:
        """Run one plan; errors.CpuPoolLost if the CPU pool was lost in it, GpuWorkerLost if the worker is gone."""
        ...

    def submit(self, plan: StepPlan, after_step_id: int | None = None) -> "asyncio.Task[StepOutput]":
        """Send a plan, to run right after step after_step_id (None: after what was sent before it); the task that
        awaits its output: step()'s errors, and errors.StepRefused for a plan made ahead of a step that failed."""
        ...

    async def info(self) -> WorkerInfo:
        """The worker as it is now (GpuWorkerLost if it is gone)."""
        ...

    async def reset(self) -> int:
        """Drop the state of every request; how many the worker held (GpuWorkerLost if it is gone)."""
        ...


def replacement(before: WorkerInfo, now: WorkerInfo) -> str:
    """What makes `now` another worker than `before` for a scheduler (its model, accelerator pool or block size), in
    words; "" when it is the same."""
    changed = [
        f"{name} {getattr(before, name)!r} -> {getattr(now, name)!r}"
        for name in ("model_config_hash", "num_kv_blocks", "block_size")
        if getattr(before, name) != getattr(now, name)
    ]
    return ", ".join(changed)
