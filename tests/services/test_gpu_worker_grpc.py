"""The gpu_worker's gRPC edge in-process over a Unix socket: a Step with an enum value this build does not know
answers INVALID_ARGUMENT naming the field, and leaves the worker serving."""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from worker_server import worker_server

from apex_serve import convert, rpc
from apex_serve.types import NewRequestData, SamplingParams, StepPlan
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
async def stub(mha_model_dir: Path) -> AsyncIterator[gpu_worker_pb2_grpc.GpuWorkerStub]:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", block_size=4, num_kv_blocks=16))
    async with worker_server(runner) as address, rpc.channel(address) as channel:
        yield gpu_worker_pb2_grpc.GpuWorkerStub(channel)


def _plan(step_id: int) -> gpu_worker_pb2.StepRequest:
    return convert.plan_to_pb(StepPlan(step_id, (NewRequestData(f"r{step_id}", (256, 1, 2), GREEDY, (0,)),)))


async def test_a_step_with_an_unknown_mode_is_invalid_argument_naming_the_field(
    stub: gpu_worker_pb2_grpc.GpuWorkerStub,
) -> None:
    request = _plan(0)
    request.mode = 7
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("mode: ExecutionMode 7 is not one of")
    reply = await stub.Step(_plan(1))
    assert set(convert.step_output_from_pb(reply).sampled) == {"r1"}


async def test_a_step_with_an_unknown_placement_is_invalid_argument_naming_the_request(
    stub: gpu_worker_pb2_grpc.GpuWorkerStub,
) -> None:
    request = _plan(0)
    request.new_requests[0].placement = 9
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Step(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("new_requests[0].placement: Placement 9 is not one of")
