"""Readiness follows each replica's engine: a replica that runs no step for stall_timeout_s while it has requests
running is not ready (HTTP /health 503) until it steps again; an idle replica that runs no step stays ready."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from apex_serve.types import WorkerInfo
from apex_serve.v1 import scheduler_pb2
from conftest import wait_until_async
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas

WORKER = WorkerInfo(
    model_name="stats", num_layers=1, vocab_size=258, max_model_len=64, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)


class StatsScheduler:
    """Stands in for the scheduler stub: GetStats answers what the test sets."""

    def __init__(self) -> None:
        self.stats = scheduler_pb2.SchedulerStats()

    async def GetStats(self, request: scheduler_pb2.GetStatsRequest, timeout: float) -> scheduler_pb2.SchedulerStats:
        return self.stats


@pytest.fixture
async def served(default_model_dir: Path) -> AsyncIterator[tuple[Replicas, StatsScheduler, str]]:
    scheduler = StatsScheduler()
    replicas = Replicas([Replica("stats", scheduler)])  # type: ignore[arg-type]
    replicas.watch_progress(stall_timeout_s=0.3, poll_s=0.02)
    config = GatewayConfig(model_dir=str(default_model_dir), http_address="127.0.0.1:0")
    generator = Generator.for_config(config, WORKER, replicas, "stats")
    server = HttpServer(generator, config)
    await server.start()
    yield replicas, scheduler, f"http://127.0.0.1:{server.port}"
    await server.stop()
    await replicas.close()


async def test_a_replica_running_requests_without_a_step_is_not_ready_until_it_steps(served) -> None:
    replicas, scheduler, url = served
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        scheduler.stats = scheduler_pb2.SchedulerStats(num_running=2, num_steps=7)
        await wait_until_async(lambda: replicas.replicas[0].stalled, 5.0, "the replica to be seen stalled")
        response = await c.get("/health")
        assert response.status_code == 503 and "stalled" in response.json()["error"]["message"]
        scheduler.stats = scheduler_pb2.SchedulerStats(num_running=2, num_steps=8)
        await wait_until_async(lambda: not replicas.replicas[0].stalled, 5.0, "the replica to step again")
        assert (await c.get("/health")).status_code == 200


async def test_an_idle_replica_without_a_step_stays_ready(served) -> None:
    replicas, scheduler, url = served
    scheduler.stats = scheduler_pb2.SchedulerStats(num_running=0, num_waiting=0, num_steps=3)
    await asyncio.sleep(0.6)  # twice the stall timeout, many polls
    assert not replicas.replicas[0].stalled
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        assert (await c.get("/health")).status_code == 200
