"""The HTTP API's Host check against DNS rebinding: on a loopback bind address only loopback names are answered
by default, an explicit allow-list always applies, a wildcard bind checks nothing by default, and /health stays
open to every Host (an in-process gateway over a scheduler stand-in that is never called). The scheduler's
metrics port keeps no thread per open connection."""

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from apex_serve.types import WorkerInfo
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.hosts import LOOPBACK_NAMES, allowed_hosts, host_name
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas
from scheduler_service.telemetry.metrics_server import MetricsServer

WORKER = WorkerInfo(
    model_name="m", num_layers=1, vocab_size=258, max_model_len=256, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=16, device="cpu", dtype="float32",
)
Gateway = Callable[..., AbstractAsyncContextManager[int]]


@pytest.fixture
def gateway(default_model_dir: Path) -> Gateway:
    @asynccontextmanager
    async def start(http_address: str = "127.0.0.1:0", allowed_hosts: str = "") -> AsyncIterator[int]:
        config = GatewayConfig(
            model_dir=str(default_model_dir), http_address=http_address, allowed_hosts=allowed_hosts
        )
        generator = Generator.for_config(
            config, WORKER, Replicas([Replica("unused", object())]), "m"  # type: ignore[arg-type]
        )
        server = HttpServer(generator, config)
        await server.start()
        try:
            yield server.port
        finally:
            await server.stop()

    return start


async def _get(port: int, path: str, host: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(f"http://127.0.0.1:{port}{path}", headers={"host": host})


def _assert_refused(reply: httpx.Response, host: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "Host") and host in error["message"]


@pytest.mark.parametrize(
    ("value", "name"),
    [("localhost:8000", "localhost"), ("LocalHost", "localhost"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
     ("127.0.0.1:80", "127.0.0.1"), ("::1", "::1"), ("api.example", "api.example")],
)
def test_host_name_drops_port_brackets_and_case(value: str, name: str) -> None:
    assert host_name(value) == name


def test_allowed_hosts_by_bind_address_and_list() -> None:
    assert allowed_hosts(frozenset(), "127.0.0.1:8000") == LOOPBACK_NAMES
    assert allowed_hosts(frozenset(), "[::1]:8000") == LOOPBACK_NAMES
    assert allowed_hosts(frozenset(), "localhost:8000") == LOOPBACK_NAMES
    assert allowed_hosts(frozenset(), "127.0.0.2:8000") == LOOPBACK_NAMES | {"127.0.0.2"}
    assert allowed_hosts(frozenset(), "0.0.0.0:8000") is None and allowed_hosts(frozenset(), "[::]:8000") is None
    assert allowed_hosts(frozenset({"api.example"}), "127.0.0.1:8000") == {"api.example"}
    assert allowed_hosts(frozenset({"*"}), "127.0.0.1:8000") is None


def test_the_config_reads_the_list(default_model_dir: Path) -> None:
    config = GatewayConfig(model_dir=str(default_model_dir), allowed_hosts=" API.example, [::1] ,,10.0.0.5")
    assert config.allowed_host_set == {"api.example", "::1", "10.0.0.5"}


async def test_a_loopback_gateway_answers_loopback_names_only(gateway: Gateway) -> None:
    async with gateway() as port:
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert (await _get(port, "/v1/models", host)).status_code == 200, host
        for path in ("/v1/models", "/dashboard", "/dashboard/data", "/metrics"):
            _assert_refused(await _get(port, path, f"evil.example:{port}"), "evil.example")
        for path in ("/health", "/ping"):  # probes send whatever Host (a pod IP): open, as they tell only up/down
            assert (await _get(port, path, "10.1.2.3:8000")).status_code == 200, path

        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # HTTP/1.0 may leave Host out
        writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
        reply = await reader.read()
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400") and b"missing Host header" in reply


async def test_an_explicit_list_applies_on_any_bind_address(gateway: Gateway) -> None:
    async with gateway(allowed_hosts="api.example,10.0.0.5") as port:
        assert (await _get(port, "/v1/models", "API.example:443")).status_code == 200
        assert (await _get(port, "/v1/models", "10.0.0.5")).status_code == 200
        _assert_refused(await _get(port, "/v1/models", f"localhost:{port}"), "localhost")
    async with gateway(http_address="0.0.0.0:0", allowed_hosts="api.example") as port:
        _assert_refused(await _get(port, "/v1/models", "evil.example"), "evil.example")


async def test_a_wildcard_bind_or_star_checks_nothing(gateway: Gateway) -> None:
    async with gateway(http_address="0.0.0.0:0") as port:
        assert (await _get(port, "/v1/models", "evil.example")).status_code == 200
    async with gateway(allowed_hosts="*") as port:
        assert (await _get(port, "/v1/models", "evil.example")).status_code == 200


def _os_threads() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


async def test_idle_connections_to_the_metrics_port_cost_no_thread() -> None:
    registry = CollectorRegistry()
    Counter("apex_probe", "A counter to scrape", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1:0")
    await server.start()
    idle: list[socket.socket] = []
    try:
        threads, os_threads = threading.active_count(), _os_threads()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
        await asyncio.sleep(0.3)  # the loop accepts them
        assert threading.active_count() - threads < 5 and _os_threads() - os_threads < 5
        async with httpx.AsyncClient(timeout=5) as c:
            reply = await c.get(f"http://127.0.0.1:{server.port}/metrics")
        assert reply.status_code == 200 and "apex_probe_total 3.0" in reply.text
    finally:
        started = time.monotonic()
        await server.stop()
        for sock in idle:
            sock.close()
    assert time.monotonic() - started < 3, "idle connections held up the stop"
