"""While the CPU pool is lost (Scheduler.cpu_pool_degraded), the engine loop asks this about once a second whether the
gpu_worker has attached a CPU pool again: a data plane newer than the lost one. It then hands the pool back to the
scheduler, with a cost model for it where the new data plane's CPU profile (CPU KV dtype, CPU rows, bytes staged per
row, hardware; not its block count) differs from the one the scheduler predicts with. That model is loaded in the
background while the accelerator serves on (the profiler profiles only when no stored profile matches)."""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from apex_serve.types import WorkerInfo
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.loader import load_cost_model
from scheduler_service.cost.model import ComposedCostModel
from scheduler_service.scheduler import Scheduler
from scheduler_service.worker_port import GpuWorkerLost, WorkerPort

logger = logging.getLogger(__name__)
POLL_INTERVAL_S = 1.0
RELOAD_RETRY_S = 30.0  # after the cost model of a new profile failed to load

CostModelLoader = Callable[[SchedulerConfig, WorkerInfo], Awaitable[ComposedCostModel | None]]
ProfileKey = tuple[object, ...]


def cpu_profile_key(info: WorkerInfo) -> ProfileKey:
    """What the cost model's CPU side depends on, of a CPU pool."""
    return (info.cpu_kv_dtype, info.cpu_max_rows, info.bytes_per_cpu_row, info.hardware)


class CpuPoolWatch:
    def __init__(self, scheduler: Scheduler, worker: WorkerPort, load: CostModelLoader = load_cost_model,
                 interval_s: float = POLL_INTERVAL_S) -> None:
        self._scheduler = scheduler
        self._worker = worker
        self._load = load
        self._interval_s = interval_s
        self._profile = cpu_profile_key(scheduler.worker_info)  # the CPU pool the scheduler's cost model is for
        self._lost_generation = 0  # a data plane restores the pool only if newer than this
        self._next_poll = 0.0  # time.monotonic()
        self._loading: tuple[ProfileKey, asyncio.Task[ComposedCostModel | None]] | None = None

    def lost(self) -> None:
        """The CPU pool was lost in a step: only a data plane attached after the latest known one restores it."""
        self._lost_generation = self._scheduler.worker_info.cpu_pool_generation
        self._next_poll = time.monotonic() + self._interval_s

    def worker_back(self) -> None:
        """The gpu_worker came back and was Reset: any CPU pool it reports attached is usable; look at once."""
        self._lost_generation = 0
        self._next_poll = 0.0

    def wait_s(self) -> float | None:
        """How long an idle loop may wait before poll() has something to do; None while the pool is attached."""
        if not self._scheduler.cpu_pool_degraded:
            return None
        return max(0.0, self._next_poll - time.monotonic())

    async def poll(self) -> None:
        """While degraded, at most once an interval: restore the CPU pool if the worker reports a newer one attached
        (and the cost model of its profile is ready). GpuWorkerLost propagates: the loop reconnects."""
        now = time.monotonic()
        if not self._scheduler.cpu_pool_degraded or now < self._next_poll:
            return
        self._next_poll = now + self._interval_s
        try:
            info = await self._worker.info()
        except GpuWorkerLost:
            raise
        except Exception as exc:  # a failing call: the next poll asks again
            logger.warning("could not read the gpu_worker's info: %s", exc)
            return
        if not info.cpu_pool_attached or info.cpu_pool_generation <= self._lost_generation:
            return
        profile = cpu_profile_key(info)
        cost_model = None
        if profile != self._profile and self._scheduler.policy.uses_cpu:
            task = self._loading_task(profile, info)
            if not task.done():
                return
            self._loading = None
            try:
                cost_model = task.result()
            except Exception as exc:  # the profiler is away or failed: stay on the accelerator, try again later
                logger.warning("no cost model for the CPU pool of generation %d (%s): trying again in %.0f s",
                               info.cpu_pool_generation, exc, RELOAD_RETRY_S)
                self._next_poll = now + RELOAD_RETRY_S
                return
        self.close()
        self._scheduler.cpu_pool_restored(info, cost_model)
        self._profile = profile
        logger.info("CPU pool back (generation %d, %d blocks%s): placing on the CPU again", info.cpu_pool_generation,
                    info.num_cpu_kv_blocks, "" if cost_model is None else ", a new cost model")

    def close(self) -> None:
        """Stop loading a cost model, if one is loading."""
        if self._loading is not None:
            self._loading[1].cancel()
            self._loading = None

    def _loading_task(self, profile: ProfileKey, info: WorkerInfo) -> asyncio.Task[ComposedCostModel | None]:
        if self._loading is None or self._loading[0] != profile:
            self.close()
            logger.info("the CPU pool of generation %d has another profile than the cost model: loading its model",
                        info.cpu_pool_generation)
            task = asyncio.create_task(self._load(self._scheduler.config, info), name="cpu-pool-cost-model")
            self._loading = (profile, task)
        return self._loading[1]
