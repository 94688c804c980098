"""Plans on the gpu_worker's Steps stream, against a real ModelRunner over gRPC: replies in order, a failed step
answered with its error (INVALID_ARGUMENT naming the field, as a Step call would end), a plan made ahead of it refused
(StepRefused), and one made after it run."""

from pathlib import Path

import grpc
import pytest

from apex_serve import errors
from apex_serve.types import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.worker_client import WorkerClient
from worker_server import worker_server

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


async def test_a_failed_step_on_the_stream_answers_its_error_and_refuses_the_plan_made_ahead_of_it(
        mha_model_dir: Path) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", block_size=4, num_kv_blocks=40))
    async with worker_server(runner) as address:
        client = WorkerClient(address)
        try:
            admit = client.submit(StepPlan(0, (NewRequestData("a", (256, 5, 6), GREEDY, (0, 1)),)))
            decode = client.submit(StepPlan(1, cached_requests=(CachedRequestData("a"),), planned_ahead=True), 0)
            unknown = client.submit(StepPlan(2, cached_requests=(CachedRequestData("nobody"),), planned_ahead=True),
                                    1)
            ahead = client.submit(StepPlan(3, cached_requests=(CachedRequestData("a"),), planned_ahead=True), 2)
            assert list((await admit).sampled) == ["a"] and list((await decode).sampled) == ["a"]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await unknown
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cached_requests" in failed.value.details() and "'nobody'" in failed.value.details()
            with pytest.raises(errors.StepRefused, match="planned ahead of a step that failed"):
                await ahead
            after = await client.submit(StepPlan(4, cached_requests=(CachedRequestData("a"),)))
            assert list(after.sampled) == ["a"]
        finally:
            await client.close()
