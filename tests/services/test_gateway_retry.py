"""The gateway across a scheduler restart: a request that finds no SERVING scheduler, or fails UNAVAILABLE before its
first token, waits up to unavailable_retry_s for one and is submitted there again (same request id); with 0 it fails
UNAVAILABLE at once; one that already streamed a token fails when the scheduler dies (UNAVAILABLE on gRPC, an error
event then [DONE] on HTTP); a waiting request ends when its client goes away. /health says "degraded" while the
scheduler's GetStats reports its CPU pool lost. In process, over real gRPC, with a stand-in scheduler that answers one
token and is stopped and started again on a fixed port."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from apex_serve import convert, rpc
from apex_serve.errors import Unavailable
from apex_serve.types import WorkerInfo
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc
from attach_over_submit import attach_over_submit
from conftest import wait_until_async
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replicas
from gateway.servicer import GatewayServicer
from one_token_scheduler import OneTokenScheduler

WORKER = WorkerInfo(
    model_name="retry", num_layers=1, vocab_size=258, max_model_len=4096, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)
DEGRADED_DETAIL = "CPU pool lost, serving on the accelerator only"


class StandInScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers every Submit (on its own or on the Attach stream) with one token that finishes it (OneTokenScheduler);
    the first `fail_first` Submits fail UNAVAILABLE before any token instead, and with `hang_after_token` the token
    does not finish the request and the stream then stays open. GetStats answers `stats`."""

    def __init__(self, fail_first: int = 0, hang_after_token: bool = False) -> None:
        self.one_token = OneTokenScheduler()
        self.fail_first = fail_first
        self.hang_after_token = hang_after_token
        self.failed: list[str] = []
        self.stats = scheduler_pb2.SchedulerStats()

    @property
    def answered(self) -> list[str]:
        return [r.request_id for r in self.one_token.requests]

    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        if len(self.failed) < self.fail_first:
            self.failed.append(request.request_id)
            raise Unavailable("stand-in: the step failed")
        async for msg in self.one_token.Submit(request):
            if self.hang_after_token:
                yield scheduler_pb2.SubmitResponse(token_ids=msg.token_ids)
                await asyncio.Event().wait()
            yield msg

    async def Attach(
        self, request_iterator: AsyncIterator[scheduler_pb2.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.OutputBatch]:
        async for batch in attach_over_submit(self.Submit, request_iterator, context):
            yield batch

    async def GetStats(
        self, request: scheduler_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SchedulerStats:
        return self.stats

    async def GetWorkerInfo(
        self, request: gpu_worker_pb2.GetWorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.WorkerInfo:
        return convert.worker_info_to_pb(WORKER)


@dataclass
class RunningScheduler:
    scheduler: StandInScheduler
    server: grpc.aio.Server

    async def stop(self) -> None:
        """As a process that dies: its streams end UNAVAILABLE, its port refuses connections."""
        await self.server.stop(None)


StartScheduler = Callable[..., Awaitable[RunningScheduler]]


@pytest.fixture
async def start_scheduler() -> AsyncIterator[StartScheduler]:
    """Starts a stand-in scheduler on a port, SERVING; those still running at the end of the test are stopped."""
    started: list[RunningScheduler] = []

    async def start(port: int, scheduler: StandInScheduler | None = None) -> RunningScheduler:
        scheduler = scheduler or StandInScheduler()
        server = rpc.create_server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
        health = rpc.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        rpc.bind(server, f"127.0.0.1:{port}")
        await server.start()
        started.append(RunningScheduler(scheduler, server))
        return started[-1]

    yield start
    for running in started:
        await running.stop()


@dataclass
class Gateway:
    generator: Generator
    replicas: Replicas
    address: str
    url: str


OpenGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def open_gateway(default_model_dir: Path) -> AsyncIterator[OpenGateway]:
    """Opens a gateway on a scheduler address as gateway/server.py wires one: gRPC and HTTP, progress watched."""
    opened: list[tuple[Replicas, grpc.aio.Server, HttpServer]] = []

    async def open_(scheduler_address: str, unavailable_retry_s: float) -> Gateway:
        config = GatewayConfig(model_dir=str(default_model_dir), http_address="127.0.0.1:0",
                               scheduler_address=scheduler_address, unavailable_retry_s=unavailable_retry_s)
        replicas, worker = await Replicas.connect(config.scheduler_addresses, 10.0, config.unavailable_retry_s)
        replicas.watch_progress(config.stall_timeout_s, poll_s=0.05)
        generator = Generator.for_config(config, worker, replicas)
        server = rpc.create_server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(generator), server)
        address = rpc.bind(server, "127.0.0.1:0")
        await server.start()
        http = HttpServer(generator, config)
        await http.start()
        opened.append((replicas, server, http))
        return Gateway(generator, replicas, address, f"http://127.0.0.1:{http.port}")

    yield open_
    for replicas, server, http in opened:
        await http.stop()
        await server.stop(None)
        await replicas.close()


@pytest.fixture
def scheduler_port() -> int:
    """A fixed port the stand-in scheduler is started on, and started again on after a stop."""
    return rpc.free_tcp_port()


async def _generate(address: str, request_id: str) -> list[gateway_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt="hi", request_id=request_id)
        return [msg async for msg in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]


def _text_and_finish(messages: list[gateway_pb2.GenerateResponse]) -> tuple[str, bool]:
    text = "".join(m.chunk.text for m in messages if m.WhichOneof("response") == "chunk")
    return text, messages[-1].WhichOneof("response") == "complete"


async def _down(gateway: Gateway) -> None:
    await wait_until_async(lambda: not gateway.replicas.serving, 5.0, "the gateway to see the scheduler gone")


async def test_a_request_sent_while_the_scheduler_is_down_waits_and_completes_once_it_is_back(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    first = await start_scheduler(scheduler_port)
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=30.0)
    await first.stop()
    await _down(gateway)
    request = asyncio.create_task(_generate(gateway.address, "across-restart"))
    await wait_until_async(lambda: gateway.generator.num_active == 1, 5.0, "the gateway to accept the request")
    assert not request.done(), "the request did not wait for a scheduler"
    second = await start_scheduler(scheduler_port)
    assert _text_and_finish(await asyncio.wait_for(request, 10.0)) == ("A", True)
    assert second.scheduler.answered == ["across-restart"], "the restarted scheduler did not get the request"


async def test_unavailable_before_the_first_token_is_submitted_again_with_the_same_request_id(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port, StandInScheduler(fail_first=2))
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=30.0)
    assert _text_and_finish(await _generate(gateway.address, "twice-failed")) == ("A", True)
    assert running.scheduler.failed == ["twice-failed"] * 2
    assert running.scheduler.answered == ["twice-failed"]
    assert gateway.replicas.replicas[0].in_flight == 0


async def test_without_a_retry_window_a_request_fails_unavailable_at_once(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port, StandInScheduler(fail_first=1))
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=0.0)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _generate(gateway.address, "no-retry")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "step failed" in failed.value.details()
    assert running.scheduler.failed == ["no-retry"] and running.scheduler.answered == []

    await running.stop()
    await _down(gateway)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _generate(gateway.address, "none-serving")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "no scheduler replica is SERVING" in str(
        failed.value.details())
    assert time.monotonic() - started < 1.0, "the request waited without a retry window"


async def test_a_request_fails_unavailable_once_the_retry_window_ends_without_a_scheduler(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port)
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=0.5)
    await running.stop()
    await _down(gateway)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _generate(gateway.address, "window-over")
    waited = time.monotonic() - started
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.5 <= waited < 3.0, f"the request failed after {waited:.2f} s, not when its 0.5 s window ended"
    assert gateway.generator.num_active == 0


async def test_a_waiting_request_ends_when_its_client_goes_away(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port)
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=30.0)
    await running.stop()
    await _down(gateway)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
        body = {"model": gateway.generator.model_name, "prompt": "hi", "max_tokens": 1}
        request = asyncio.create_task(c.post("/v1/completions", json=body))
        await wait_until_async(lambda: gateway.generator.num_active == 1, 5.0, "the gateway to accept the request")
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    await wait_until_async(lambda: gateway.generator.num_active == 0, 5.0,
                           "the gateway to end the request whose client went away")
    assert gateway.replicas.replicas[0].in_flight == 0


async def test_a_request_that_streamed_a_token_fails_when_the_scheduler_dies(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port, StandInScheduler(hang_after_token=True))
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=30.0)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(prompt="hi"))
        messages = aiter(call)
        assert (await anext(messages)).chunk.text == "A"
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
            body = {"model": gateway.generator.model_name, "prompt": "hi", "max_tokens": 4, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                assert '"text":"A"' in await anext(lines)
                await running.stop()
                rest = [line async for line in lines if line]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await anext(messages)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(rest) == 2, f"the stream should end with an error event and [DONE], got {rest}"
    assert json.loads(rest[0].removeprefix("data: "))["error"]["type"] == "service_unavailable_error"
    assert rest[1] == "data: [DONE]"
    answered = running.scheduler.answered
    assert len(answered) == len(set(answered)) == 2, "a request that had a token was submitted again"


async def test_health_says_degraded_while_the_scheduler_has_lost_its_cpu_pool(
    open_gateway: OpenGateway, start_scheduler: StartScheduler, scheduler_port: int
) -> None:
    running = await start_scheduler(scheduler_port)
    gateway = await open_gateway(f"127.0.0.1:{scheduler_port}", unavailable_retry_s=30.0)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        running.scheduler.stats = scheduler_pb2.SchedulerStats(cpu_pool_degraded=True, cpu_pool_losses=1)
        await wait_until_async(lambda: gateway.replicas.replicas[0].degraded, 5.0, "the gateway to see it degraded")
        degraded = {"status": "degraded", "detail": f"127.0.0.1:{scheduler_port}: {DEGRADED_DETAIL}"}
        for response in (await c.get("/health"), await c.get("/ping"), await c.post("/ping")):
            assert response.status_code == 200 and response.json() == degraded
        running.scheduler.stats = scheduler_pb2.SchedulerStats(cpu_pool_losses=1)
        await wait_until_async(lambda: not gateway.replicas.replicas[0].degraded, 5.0, "the CPU pool to be back")
        assert (await c.get("/health")).json() == {"status": "ok"}
        running.scheduler.stats = scheduler_pb2.SchedulerStats(cpu_pool_degraded=True, cpu_pool_losses=2)
        await wait_until_async(lambda: gateway.replicas.replicas[0].degraded, 5.0, "the gateway to see it degraded")
        await running.stop()
        await _down(gateway)
        assert (await c.get("/health")).status_code == 503, "a replica that is not SERVING counts as degraded"
