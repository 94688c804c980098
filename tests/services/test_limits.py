"""The stack's limits as a client meets them: a chat without max_tokens gets the room its KV pool really has when that
pool is smaller than the context, and no more than max_num_seqs requests run at once however many stream."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from apex_serve import rpc
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from apex_tools.launcher import Stack
from conftest import running_stack

NUM_KV_BLOCKS = 8  # 128 tokens of 16: far less than the model's context of 2048
MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    with running_stack(default_model_dir, policy="gpu-only", num_kv_blocks=NUM_KV_BLOCKS,
                       max_num_seqs=MAX_NUM_SEQS) as s:
        yield s


def _url(stack: Stack) -> str:
    return f"http://{stack.config.http_address}"


async def _stats(channel: grpc.aio.Channel) -> scheduler_pb2.SchedulerStats:
    return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def test_a_chat_without_max_tokens_gets_the_room_of_a_pool_smaller_than_the_context(stack: Stack) -> None:
    model = Path(stack.config.model_dir).name
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "ignore_eos": True}
    with httpx.Client(base_url=_url(stack), timeout=120) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    pool_tokens = NUM_KV_BLOCKS * 16
    assert answer["choices"][0]["finish_reason"] == "length"
    # the pool holds the KV of every token but the last generated one
    assert usage["prompt_tokens"] + usage["completion_tokens"] == pool_tokens + 1


async def test_running_requests_never_exceed_max_num_seqs_while_three_times_as_many_stream(stack: Stack) -> None:
    model = Path(stack.config.model_dir).name
    body = {"model": model, "prompt": "hi", "max_tokens": 24, "ignore_eos": True, "stream": True}
    seen: list[int] = []

    async def stream(http: httpx.AsyncClient) -> str:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            return [line async for line in response.aiter_lines() if line][-1]

    async with (
        httpx.AsyncClient(base_url=_url(stack), timeout=120) as http,
        grpc.aio.insecure_channel(rpc.unix_address(stack.config.run_dir, "scheduler")) as channel,
    ):
        streams = asyncio.gather(*(stream(http) for _ in range(3 * MAX_NUM_SEQS)))
        while not streams.done():
            seen.append((await _stats(channel)).num_running)
            await asyncio.sleep(0.005)
        assert all(last == "data: [DONE]" for last in await streams)
    assert max(seen) == MAX_NUM_SEQS, f"num_running sampled: {seen}"
