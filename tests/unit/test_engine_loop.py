"""The engine loop: streams, aborts that free blocks at once, a failing worker step, and the cost model's fit."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from queued_steps import QueuedSteps

from apex_serve.types import FinishReason, Placement, SamplingParams, StepOutput, StepPlan, StepTimings, WorkerInfo
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.cost.shape import ModelShape
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler

INFO = WorkerInfo("fake", 1, 50, 256, (0,), 4, 32, "cpu", "float32")


class Port(QueuedSteps):
    """A worker port around a step function: its info is INFO, and Reset finds nothing to drop."""

    def __init__(self, step: Callable[[StepPlan], Awaitable[StepOutput]]) -> None:
        self.step = step

    async def info(self) -> WorkerInfo:
        return INFO

    async def reset(self) -> int:
        return 0


class Worker(Port):
    """Samples token 7 for every scheduled row; fails the steps listed in `fail_steps`."""

    def __init__(self, fail_steps: set[int] = frozenset(), delay_s: float = 0.0) -> None:
        super().__init__(self._step)
        self.fail_steps = fail_steps
        self.delay_s = delay_s

    async def _step(self, plan: StepPlan) -> StepOutput:
        await asyncio.sleep(self.delay_s)
        if plan.step_id in self.fail_steps:
            raise ConnectionError("worker went away")
        ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
        return StepOutput(plan.step_id, dict.fromkeys(ids, 7))


def all_blocks_free(loop: EngineLoop) -> bool:
    stats = loop.scheduler.stats()
    return stats.free_blocks[Placement.GPU] == stats.total_blocks[Placement.GPU]


async def _drain(queue: asyncio.Queue) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(queue.get(), 30)
        items.append(item)
        if isinstance(item, Exception) or item.finished:
            return items


async def test_streams_every_token_then_the_finish_reason_and_frees_blocks() -> None:
    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO), Worker())
    loop.start()
    queues = [loop.submit(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=5)) for i in range(3)]
    streams = await asyncio.gather(*(_drain(q) for q in queues))
    await loop.stop()
    for items in streams:
        assert [t for o in items for t in o.new_token_ids] == [7] * 5
        assert items[-1].finish_reason is FinishReason.LENGTH
    assert all_blocks_free(loop)


async def test_abort_ends_the_stream_with_abort_and_frees_blocks_at_once() -> None:
    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO), Worker(delay_s=0.01))
    loop.start()
    queue = loop.submit("long", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    await queue.get()
    assert loop.abort("long") is True
    assert all_blocks_free(loop)
    items = await _drain(queue)
    assert items[-1].finish_reason is FinishReason.ABORT
    assert loop.abort("long") is False, "abort must be idempotent"
    await loop.stop()


async def test_a_failed_step_fails_its_requests_and_the_loop_keeps_serving() -> None:
    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO), Worker(fail_steps={0}))
    loop.start()
    failed = await _drain(loop.submit("first", [1, 2], SamplingParams(max_tokens=3)))
    assert isinstance(failed[-1], ConnectionError)
    served = await _drain(loop.submit("second", [1, 2], SamplingParams(max_tokens=3)))
    assert served[-1].finish_reason is FinishReason.LENGTH
    await loop.stop()
    assert all_blocks_free(loop)


async def test_stop_aborts_running_and_waiting_requests_and_drops_them_from_the_worker() -> None:
    worker = Worker(delay_s=0.01)
    plans: list[StepPlan] = []

    async def step(plan: StepPlan) -> StepOutput:
        plans.append(plan)
        return await worker.step(plan)

    loop = EngineLoop(Scheduler(SchedulerConfig(max_num_seqs=1), INFO), Port(step))
    loop.start()
    running = loop.submit("running", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    waiting = loop.submit("waiting", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    await running.get()
    await loop.stop()
    assert (await _drain(running))[-1].finish_reason is FinishReason.ABORT
    assert (await _drain(waiting))[-1].finish_reason is FinishReason.ABORT
    assert plans[-1].is_empty and plans[-1].freed_request_ids == ("running",)
    stats = loop.scheduler.stats()
    assert stats.num_running == stats.num_waiting == 0


async def test_stop_during_a_step_that_frees_a_finished_request_still_drops_it_from_the_worker() -> None:
    worker = Worker()
    plans: list[StepPlan] = []
    hung = asyncio.Event()

    async def step(plan: StepPlan) -> StepOutput:
        plans.append(plan)
        if "short" in plan.freed_request_ids and not hung.is_set():
            hung.set()
            await asyncio.Event().wait()  # the step runs on when stop() comes; its answer is never awaited
        return await worker.step(plan)

    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO), Port(step))
    loop.start()
    short = loop.submit("short", [1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True))
    long = loop.submit("long", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
    assert (await _drain(short))[-1].finish_reason is FinishReason.LENGTH
    await asyncio.wait_for(hung.wait(), 30)
    await loop.stop()
    assert (await _drain(long))[-1].finish_reason is FinishReason.ABORT
    assert set(plans[-1].freed_request_ids) == {"short", "long"} and plans[-1].is_empty


class TimedWorker(Worker):
    """A Worker whose steps report 1 ms."""

    async def _step(self, plan: StepPlan) -> StepOutput:
        return replace(await super()._step(plan), timings=StepTimings(total_ns=1_000_000))


async def test_the_loop_fits_the_cost_model_to_every_step_but_at_most_the_latest() -> None:
    model = ConstantCostModel(ConstantCosts(lin_ns=100_000.0, step_ns=50_000.0), ModelShape(
        num_layers=1, hidden_size=64, intermediate_size=128, num_q_heads=2, num_kv_heads=2, head_dim=32,
        vocab_size=50))
    loop = EngineLoop(Scheduler(SchedulerConfig(), INFO, model), TimedWorker())
    loop.start()
    await _drain(loop.submit("a", [1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True)))
    steps = sum(loop.scheduler.stats().iterations_by_mode.values())
    assert steps >= 6 and steps - 1 <= model.num_observed <= steps  # a step is fitted once the next one is sent
    await _drain(loop.submit("b", [1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True)))
    await loop.stop()
    steps = sum(loop.scheduler.stats().iterations_by_mode.values())
    assert steps >= 12 and steps - 1 <= model.num_observed <= steps
