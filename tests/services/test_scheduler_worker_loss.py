"""The scheduler_service against a gpu_worker that fails it, over real gRPC in process: the worker client turns the
error kind of a lost CPU pool into CpuPoolLost and a worker that is gone into GpuWorkerLost, for calls and for plans on
the Steps stream; while the worker is gone
the scheduler's health is NOT_SERVING and Submit answers UNAVAILABLE at once; once a worker answers at the address
again the scheduler Resets it and serves."""

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apex_serve import convert, rpc
from apex_serve.errors import CpuPoolLost
from apex_serve.types import NewRequestData, SamplingParams, StepOutput, StepPlan, WorkerInfo
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from conftest import wait_until_async
from gpu_worker.servicer import failed_step_reply
from scheduler_service.config import SchedulerConfig
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.server import SERVICE_NAME
from scheduler_service.servicer import SchedulerServicer
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.worker_client import WorkerClient
from scheduler_service.worker_port import GpuWorkerLost

INFO = WorkerInfo("fake", 1, 50, 256, (0,), 4, 32, "cpu", "float32", model_config_hash="abc")
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


class FakeGpuWorker(gpu_worker_pb2_grpc.GpuWorkerServicer):
    """Samples token 7 for every row; loses its CPU pool in the steps of lose_in; counts Resets."""

    def __init__(self, lose_in: frozenset[int] = frozenset()) -> None:
        self.lose_in = lose_in
        self.resets = 0
        self.hold: asyncio.Event | None = None  # set: steps wait for it

    async def GetWorkerInfo(self, request: gpu_worker_pb2.GetWorkerInfoRequest,
                            context: grpc.aio.ServicerContext) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(INFO)

    async def Step(self, request: gpu_worker_pb2.StepRequest,
                   context: grpc.aio.ServicerContext) -> gpu_worker_pb2.StepResponse:
        plan = convert.plan_from_pb(request)
        if self.hold is not None:
            await self.hold.wait()
        if plan.step_id in self.lose_in:
            raise CpuPoolLost("the cpu_attention_worker missed its deadline")
        ids = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
        return convert.step_output_to_pb(StepOutput(plan.step_id, {rid: 7 for rid in ids}))

    async def Steps(self, request_iterator: AsyncIterator[gpu_worker_pb2.StepRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[gpu_worker_pb2.StepResponse]:
        async for request in request_iterator:
            try:
                yield await self.Step(request, context)
            except CpuPoolLost as exc:
                yield failed_step_reply(request.step_id, exc)

    async def Reset(self, request: gpu_worker_pb2.ResetRequest,
                    context: grpc.aio.ServicerContext) -> gpu_worker_pb2.ResetResponse:
        self.resets += 1
        return gpu_worker_pb2.ResetResponse(num_dropped=0)


async def serve_worker(worker: FakeGpuWorker, address: str) -> grpc.aio.Server:
    server = rpc.create_server()
    gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(worker, server)
    rpc.bind(server, address)
    await server.start()
    return server


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="apex-", dir="/tmp")  # short: socket paths have a length limit
    yield path
    shutil.rmtree(path)


@pytest.fixture
def worker_address() -> str:
    """TCP, not a Unix socket: a stopped gRPC server may unlink its socket path after a new one bound there."""
    return f"127.0.0.1:{rpc.free_tcp_port()}"


@pytest.fixture
async def client(worker_address: str) -> AsyncIterator[WorkerClient]:
    client = WorkerClient(worker_address)
    yield client
    await client.close()


async def test_the_worker_client_raises_cpu_pool_lost_for_its_error_kind_and_gpu_worker_lost_when_it_is_gone(
        worker_address: str, client: WorkerClient) -> None:
    worker = FakeGpuWorker(lose_in=frozenset({1}))
    servers = [await serve_worker(worker, worker_address)]
    try:
        admit = StepPlan(0, (NewRequestData("a", (1, 2), GREEDY, (0,)),))
        assert (await client.step(admit)).sampled == {"a": 7}
        with pytest.raises(CpuPoolLost, match="missed its deadline"):
            await client.step(StepPlan(1))
        await servers[0].stop(None)
        with pytest.raises(GpuWorkerLost, match=f"^gpu_worker at {worker_address}"):
            await client.step(StepPlan(2))
        with pytest.raises(GpuWorkerLost):
            await client.info()
        servers.append(await serve_worker(worker, worker_address))  # another worker at the address
        assert await client.info() == INFO  # at once: the client dialled anew
        assert await client.reset() == 0 and worker.resets == 1
    finally:
        for server in servers:
            await server.stop(None)  # a no-op for one stopped already


async def test_plans_sent_on_the_steps_stream_fail_as_their_calls_would_and_all_waiting_ones_when_the_worker_goes(
        worker_address: str, client: WorkerClient) -> None:
    worker = FakeGpuWorker(lose_in=frozenset({1}))
    server = await serve_worker(worker, worker_address)
    try:
        admit = StepPlan(0, (NewRequestData("a", (1, 2), GREEDY, (0,)),))
        steps = [client.submit(admit), client.submit(StepPlan(1)), client.submit(StepPlan(2))]
        assert (await steps[0]).sampled == {"a": 7}
        with pytest.raises(CpuPoolLost, match="missed its deadline"):
            await steps[1]
        assert (await steps[2]).step_id == 2  # the stream goes on after a failed step
        worker.hold = asyncio.Event()  # the next steps wait until the worker is gone
        waiting = [client.submit(StepPlan(3)), client.submit(StepPlan(4))]
        await asyncio.sleep(0.1)
        await server.stop(None)
        for step in waiting:
            with pytest.raises(GpuWorkerLost, match=f"^gpu_worker at {worker_address}"):
                await step
        server = await serve_worker(worker, worker_address)
        worker.hold = None
        assert (await client.submit(StepPlan(5))).step_id == 5  # a new stream, on a new channel
    finally:
        await server.stop(None)


async def test_while_the_worker_is_gone_the_scheduler_is_not_serving_and_refuses_submits_then_serves_again(
        run_dir: str, worker_address: str, client: WorkerClient) -> None:
    worker = FakeGpuWorker()
    original = await serve_worker(worker, worker_address)
    back = None
    scheduler = Scheduler(SchedulerConfig(), await client.info())
    server = rpc.create_server()
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    loop = EngineLoop(scheduler, client, service=service)
    loop.start()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(loop, EngineMetrics(scheduler).registry),
                                                       server)
    address = rpc.bind(server, rpc.unix_address(run_dir, "scheduler"))
    await server.start()
    await service.set_serving(True)
    sampling = convert.sampling_to_pb(SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    try:
        async with rpc.channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5.0)
                return reply.status

            stream = stub.Submit(scheduler_pb2.SubmitRequest(request_id="long", prompt_token_ids=[1, 2, 3],
                                                             sampling=sampling))
            first = await stream.read()
            assert list(first.token_ids) == [7]
            await original.stop(None)
            with pytest.raises(grpc.aio.AioRpcError) as lost:
                while await stream.read() != grpc.aio.EOF:
                    pass
            assert lost.value.code() == grpc.StatusCode.UNAVAILABLE and "lost the gpu_worker" in lost.value.details()
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Submit(scheduler_pb2.SubmitRequest(request_id="refused", prompt_token_ids=[1],
                                                                       sampling=sampling)):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            back = await serve_worker(worker, worker_address)

            async def serving() -> bool:
                return await status() == health_pb2.HealthCheckResponse.SERVING

            await wait_until_async(serving, 10, "the scheduler SERVING again")
            assert worker.resets == 1
            tokens = [t async for reply in stub.Submit(scheduler_pb2.SubmitRequest(
                request_id="after", prompt_token_ids=[1, 2], sampling=convert.sampling_to_pb(GREEDY)))
                for t in reply.token_ids]
            assert tokens == [7, 7, 7]
    finally:
        await loop.stop()
        await server.stop(None)
        for worker_server in (original, back):
            if worker_server is not None:
                await worker_server.stop(None)  # no-op for one stopped already
