"""The engine loop over gRPC against a real gpu_worker (ModelRunner behind GpuWorkerServicer), with asynchronous
scheduling on and off: the same greedy tokens, stop tokens that end a request in a step whose successor was already
planned (its token there is never emitted), max_tokens, an abort mid-stream, and at the end both sides hold nothing."""

import asyncio
import random
from pathlib import Path

from worker_server import worker_server

from apex_serve.types import FinishReason, Placement, RequestOutput, SamplingParams
from conftest import wait_until_async
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.config import SchedulerConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.worker_client import WorkerClient

PROMPT_LENS = (3, 9, 17, 30, 5, 24)
MAX_TOKENS = (30, 12, 25, 8, 40, 16)
ABORTED, ABORT_AFTER = "r1", 5


async def serve(model_dir: Path, async_scheduling: bool, stops: dict[str, int], abort: bool = True
                ) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Every request's tokens and finish reason; with `abort`, r1 is aborted once it has ABORT_AFTER tokens."""
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(model_dir), device="cpu", block_size=4, num_kv_blocks=40))
    async with worker_server(runner) as address:
        client = WorkerClient(address)
        try:
            return await _serve(runner, client, async_scheduling, stops, abort)
        finally:
            await client.close()


async def _serve(runner: ModelRunner, client: WorkerClient, async_scheduling: bool, stops: dict[str, int],
                 abort: bool) -> dict[str, tuple[list[int], FinishReason | None]]:
    scheduler = Scheduler(SchedulerConfig(async_scheduling=async_scheduling, sample_layers_every=0),
                          await client.info())
    loop = EngineLoop(scheduler, client)
    loop.start()
    rng = random.Random(5)

    async def run(i: int) -> tuple[list[int], FinishReason | None]:
        request_id = f"r{i}"
        prompt = [256] + [rng.randrange(256) for _ in range(PROMPT_LENS[i] - 1)]
        stop = (stops[request_id],) if request_id in stops else ()
        queue = loop.submit(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[i],
                                                               ignore_eos=True, stop_token_ids=stop))
        tokens: list[int] = []
        while True:
            out = await asyncio.wait_for(queue.get(), 60)
            assert isinstance(out, RequestOutput), out
            tokens += out.new_token_ids
            if out.finished:
                return tokens, out.finish_reason
            if abort and request_id == ABORTED and len(tokens) == ABORT_AFTER:
                assert loop.abort(request_id)

    results = await asyncio.gather(*(run(i) for i in range(len(PROMPT_LENS))))
    await wait_until_async(lambda: not runner._requests, 10, "the worker to drop every finished request")
    await loop.stop()
    stats = scheduler.stats()
    assert stats.free_blocks[Placement.GPU] == stats.total_blocks[Placement.GPU]
    return {f"r{i}": result for i, result in enumerate(results)}


async def test_async_scheduling_emits_the_tokens_of_one_step_at_a_time_and_stops_and_aborts_on_time(
        mha_model_dir: Path) -> None:
    reference = await serve(mha_model_dir, False, {}, abort=False)
    stops = {rid: tokens[len(tokens) // 2] for rid, (tokens, _) in reference.items() if rid in ("r0", "r2", "r5")}
    served = {mode: await serve(mha_model_dir, mode, stops) for mode in (False, True)}
    for rid, (ref, _) in reference.items():
        for mode, result in served.items():
            tokens, reason = result[rid]
            if rid == ABORTED:
                assert reason is FinishReason.ABORT and len(tokens) >= ABORT_AFTER, (mode, tokens)
                assert tokens == ref[:len(tokens)], mode
            elif rid in stops:
                assert (tokens, reason) == (ref[: ref.index(stops[rid]) + 1], FinishReason.STOP), (mode, rid)
            else:
                assert (tokens, reason) == (ref, FinishReason.LENGTH), (mode, rid)
