"""The scheduler's Attach stream against a real gpu_worker: the requests on one stream get transformers' greedy tokens,
one batch carries every request's output of a step (or of several, when the reader falls behind), a bad request fails
alone with the status that names its field, an abort ends a request with ABORT, and a stream that goes away aborts
its requests and frees their blocks."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import torch
from transformers import AutoModelForCausalLM

from apex_serve import convert, rpc
from apex_serve.types import Placement, SamplingParams
from apex_serve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from conftest import wait_until_async
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.config import SchedulerConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.servicer import SchedulerServicer
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.worker_client import WorkerClient
from worker_server import worker_server

PROMPTS = {"a": [256, 5, 9], "b": [256, 17, 3, 99, 4], "c": [256, 42], "d": [256, 7, 7, 7, 120, 64, 1]}
NEW_TOKENS = 8


def _greedy(max_tokens: int = NEW_TOKENS) -> common_pb2.SamplingParams:
    return convert.sampling_to_pb(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def _submit(request_id: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> scheduler_pb2.AttachRequest:
    return scheduler_pb2.AttachRequest(submit=scheduler_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=_greedy(max_tokens)))


@asynccontextmanager
async def scheduler_server(model_dir: Path) -> AsyncIterator[tuple[scheduler_pb2_grpc.SchedulerStub, Scheduler]]:
    """A scheduler (EngineLoop + SchedulerServicer) on a real gpu_worker, both over gRPC; its stub and its Scheduler.
    On exit, checks that the scheduler holds no block."""
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(model_dir), device="cpu", block_size=4, num_kv_blocks=64))
    async with worker_server(runner) as worker_address:
        client = WorkerClient(worker_address)
        scheduler = Scheduler(SchedulerConfig(sample_layers_every=0), await client.info())
        loop = EngineLoop(scheduler, client)
        loop.start()
        server = rpc.create_server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(
            SchedulerServicer(loop, EngineMetrics(scheduler).registry), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield scheduler_pb2_grpc.SchedulerStub(channel), scheduler
        finally:
            await server.stop(None)
            await loop.stop()
            await client.close()


def _reference(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _free(scheduler: Scheduler) -> bool:
    stats = scheduler.stats()
    return stats.free_blocks[Placement.GPU] == stats.total_blocks[Placement.GPU]


async def test_requests_on_one_stream_get_transformers_tokens_with_one_batch_per_step(mha_model_dir: Path) -> None:
    outbox: asyncio.Queue[scheduler_pb2.AttachRequest] = asyncio.Queue()
    for request_id, prompt in PROMPTS.items():
        outbox.put_nowait(_submit(request_id, prompt))

    async def requests() -> AsyncIterator[scheduler_pb2.AttachRequest]:
        while True:
            yield await outbox.get()

    tokens: dict[str, list[int]] = {request_id: [] for request_id in PROMPTS}
    finished: dict[str, int] = {}
    batch_sizes = []
    async with scheduler_server(mha_model_dir) as (stub, scheduler):
        call = stub.Attach(requests())
        async for batch in call:
            batch_sizes.append(len(batch.updates))
            for update in batch.updates:
                assert not update.error_code, update
                tokens[update.request_id] += update.output.token_ids
                if update.output.finished:
                    finished[update.request_id] = update.output.finish_reason
            if len(finished) == len(PROMPTS):
                break
        call.cancel()
        assert _free(scheduler)
    assert finished == dict.fromkeys(PROMPTS, common_pb2.FINISH_REASON_LENGTH)
    for request_id, prompt in PROMPTS.items():
        assert tokens[request_id] == _reference(mha_model_dir, prompt, NEW_TOKENS), request_id
    # a step's outputs go in one batch (the steps a slower reader lets pile up, in one too)
    assert max(batch_sizes) >= len(PROMPTS) and len(batch_sizes) < sum(batch_sizes) / 2, (
        f"the decode steps' outputs came one request at a time: {batch_sizes}")


async def test_a_bad_request_fails_alone_an_abort_ends_one_and_a_closed_stream_frees_the_rest(
        mha_model_dir: Path) -> None:
    outbox: asyncio.Queue[scheduler_pb2.AttachRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[scheduler_pb2.AttachRequest]:
        while True:
            yield await outbox.get()

    bad = scheduler_pb2.AttachRequest(submit=scheduler_pb2.SubmitRequest(
        request_id="bad", prompt_token_ids=[256, 1], sampling=common_pb2.SamplingParams(temperature=-1.0)))
    for message in (bad, _submit("aborted", PROMPTS["a"], 10_000), _submit("left", PROMPTS["b"], 10_000),
                    _submit("", PROMPTS["c"])):
        outbox.put_nowait(message)
    updates: dict[str, list[scheduler_pb2.RequestUpdate]] = {}
    async with scheduler_server(mha_model_dir) as (stub, scheduler):
        call = stub.Attach(requests())
        async for batch in call:
            for update in batch.updates:
                updates.setdefault(update.request_id, []).append(update)
            if "aborted" in updates and not any(u.output.finished for u in updates["aborted"]):
                outbox.put_nowait(scheduler_pb2.AttachRequest(abort_request_id="aborted"))
            if any(u.output.finished for u in updates.get("aborted", ())) and len(updates.get("left", ())) >= 2:
                break
        assert scheduler.stats().num_running == 1  # "left" runs on
        call.cancel()  # the gateway goes away
        await wait_until_async(lambda: _free(scheduler) and not scheduler.stats().num_running, 10,
                               "the scheduler to abort the requests of a closed stream")
    (failed,) = updates["bad"]
    assert failed.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "temperature" in failed.error_message
    (unnamed,) = updates[""]
    assert unnamed.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "request_id" in unnamed.error_message
    assert updates["aborted"][-1].output.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert not any(u.error_code for u in updates["left"])


async def test_a_request_id_already_on_the_stream_is_refused_and_the_first_one_runs_on(mha_model_dir: Path) -> None:
    request_id = "dup"
    outbox: asyncio.Queue[scheduler_pb2.AttachRequest] = asyncio.Queue()
    outbox.put_nowait(_submit(request_id, PROMPTS["a"]))
    outbox.put_nowait(_submit(request_id, PROMPTS["b"]))

    async def requests() -> AsyncIterator[scheduler_pb2.AttachRequest]:
        while True:
            yield await outbox.get()

    seen: list[scheduler_pb2.RequestUpdate] = []
    async with scheduler_server(mha_model_dir) as (stub, scheduler):
        call = stub.Attach(requests())
        async for batch in call:
            seen += batch.updates
            if any(u.output.finished for u in seen):
                break
        call.cancel()
        await wait_until_async(lambda: _free(scheduler), 10, "the blocks to be freed")
    errors = [u for u in seen if u.error_code]
    assert len(errors) == 1 and errors[0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    tokens = [t for u in seen if not u.error_code for t in u.output.token_ids]
    assert tokens == _reference(mha_model_dir, PROMPTS["a"], NEW_TOKENS)
