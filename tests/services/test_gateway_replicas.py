"""The gateway over several scheduler replicas: least-loaded routing with round-robin ties, one retry on
another replica after UNAVAILABLE before the first token, Abort to the holder, refusal of replicas of
different models; then two real replicas (gpu_worker + scheduler processes each) behind one gateway."""

import asyncio
import dataclasses
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from tokenizers import Tokenizer

from apex_serve import convert, rpc
from apex_serve.types import SamplingParams, WorkerInfo
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2
from apex_tools.local_engine import LocalEngine
from apex_tools.processes import Service, ServiceGroup
from conftest import wait_until_async
from gateway.config import GatewayConfig
from gateway.replicas import Replica, ReplicaMismatch, Replicas, check_same_model
from gpu_worker.config import GpuWorkerConfig

PROMPTS = [f"Replica request {i}: " + "the quick brown fox " * (i % 4) for i in range(16)]
MAX_TOKENS = 16


def _unavailable(details: str = "gone") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _token(token_id: int, finished: bool = False) -> scheduler_pb2.SubmitResponse:
    return scheduler_pb2.SubmitResponse(token_ids=[token_id], finished=finished)


class FakeScheduler:
    """A scheduler stub whose Submit plays `script` (messages, or an exception to raise), then hangs."""

    def __init__(self, script: list[scheduler_pb2.SubmitResponse | Exception] | None = None) -> None:
        self.script = script or []
        self.submitted: list[str] = []
        self.aborted: list[str] = []
        self.abort_fails = False

    def Submit(self, request: scheduler_pb2.SubmitRequest) -> "FakeCall":
        self.submitted.append(request.request_id)
        return FakeCall(self.script)

    async def Abort(self, request: scheduler_pb2.AbortRequest) -> scheduler_pb2.AbortResponse:
        self.aborted.append(request.request_id)
        if self.abort_fails:
            raise _unavailable()
        return scheduler_pb2.AbortResponse(aborted=request.request_id in self.submitted)


@dataclass
class FakeCall:
    script: list[scheduler_pb2.SubmitResponse | Exception]
    cancelled: bool = False

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        for step in self.script:
            if isinstance(step, Exception):
                raise step
            yield step
            if step.finished:
                return
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


def _replicas(*schedulers: FakeScheduler) -> Replicas:
    return Replicas([Replica(f"r{i}", s) for i, s in enumerate(schedulers)])  # type: ignore[arg-type]


def _request(request_id: str) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=[1, 2, 3])


def test_new_requests_go_to_the_least_loaded_serving_replica_round_robin_among_equals() -> None:
    replicas = _replicas(FakeScheduler(), FakeScheduler(), FakeScheduler())
    calls = [replicas.submit(_request(f"q{i}")) for i in range(6)]
    assert [c.replica.address for c in calls] == ["r0", "r1", "r2", "r0", "r1", "r2"]
    calls[1].cancel()
    calls[4].cancel()  # r1 now runs nothing
    assert [replicas.submit(_request(f"s{i}")).replica.address for i in range(3)] == ["r1", "r1", "r2"]
    assert [r.in_flight for r in replicas.replicas] == [2, 2, 3]
    replicas.replicas[0].serving = False
    replicas.replicas[1].serving = False
    assert {replicas.submit(_request(f"t{i}")).replica.address for i in range(3)} == {"r2"}
    replicas.replicas[2].serving = False
    assert not replicas.serving
    with pytest.raises(Exception, match="no scheduler replica is SERVING"):
        replicas.submit(_request("u"))
    calls[0].cancel()
    calls[0].cancel()  # idempotent
    assert replicas.replicas[0].in_flight == 1 and replicas.replicas[0].completed == 1


async def test_unavailable_before_the_first_token_is_retried_once_on_another_replica() -> None:
    down, up = FakeScheduler([_unavailable()]), FakeScheduler([_token(7), _token(8, finished=True)])
    replicas = _replicas(down, up)
    call = replicas.submit(_request("a"))
    assert call.replica.address == "r0"
    assert [list(m.token_ids) async for m in call] == [[7], [8]]
    assert call.replica.address == "r1" and down.submitted == up.submitted == ["a"]
    assert [(r.in_flight, r.submitted, r.completed) for r in replicas.replicas] == [(0, 1, 1), (0, 1, 1)]

    both_down = _replicas(FakeScheduler([_unavailable("first")]), FakeScheduler([_unavailable("second")]))
    with pytest.raises(grpc.aio.AioRpcError, match="second"):  # one retry, not more
        async for _ in both_down.submit(_request("b")):
            pass
    assert [r.in_flight for r in both_down.replicas] == [0, 0]


@pytest.mark.parametrize(
    "script",
    [
        [_token(7), _unavailable()],  # after a token: the client saw output, a retry would repeat it
        [grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad")],
    ],
)
async def test_other_failures_are_not_retried(script: list) -> None:
    first, second = FakeScheduler(script), FakeScheduler([_token(9, finished=True)])
    replicas = _replicas(first, second)
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in replicas.submit(_request("c")):
            pass
    assert second.submitted == [] and replicas.replicas[0].in_flight == 0


async def test_abort_goes_to_the_replica_holding_the_request() -> None:
    schedulers = FakeScheduler(), FakeScheduler()
    replicas = _replicas(*schedulers)
    replicas.submit(_request("x"))
    held = replicas.submit(_request("y"))
    assert held.replica.address == "r1"
    assert await replicas.abort("y") is True
    assert schedulers[1].aborted == ["y"] and schedulers[0].aborted == []
    assert await replicas.abort("not-here") is False  # asked of every replica: another gateway's, perhaps
    assert schedulers[0].aborted == ["not-here"] and schedulers[1].aborted == ["y", "not-here"]
    schedulers[0].abort_fails = True
    assert await replicas.abort("not-here") is False  # one could not say, the other did not have it
    schedulers[1].abort_fails = True
    with pytest.raises(grpc.aio.AioRpcError):  # no replica could say
        await replicas.abort("not-here")


def test_replicas_of_different_models_are_refused_naming_the_replica_and_the_field() -> None:
    info = WorkerInfo("m", 4, 259, 2048, (1,), 16, 64, "cpu", "float32", model_config_hash="abc")
    check_same_model([("unix:///a", info), ("unix:///b", dataclasses.replace(info, num_kv_blocks=8))])
    for field, value in (("model_config_hash", "def"), ("vocab_size", 300), ("max_model_len", 512)):
        with pytest.raises(ReplicaMismatch, match=rf"replica unix:///b .*{field}"):
            check_same_model([("unix:///a", info), ("unix:///b", dataclasses.replace(info, **{field: value}))])


def test_scheduler_address_lists_replicas_and_rejects_empty_or_repeated_entries(default_model_dir: Path) -> None:
    config = GatewayConfig(model_dir=str(default_model_dir), scheduler_address="unix:///a.sock, unix:///b.sock")
    assert config.scheduler_addresses == ("unix:///a.sock", "unix:///b.sock")
    for bad in ("unix:///a.sock,,unix:///b.sock", "unix:///a.sock,unix:///a.sock", ""):
        with pytest.raises(ValueError, match="scheduler_address"):
            GatewayConfig(model_dir=str(default_model_dir), scheduler_address=bad)


# Two real replicas behind one gateway.


@dataclass
class ReplicaProcesses:
    scheduler_address: str
    worker: Service
    scheduler: Service


def _start_replica(services: ServiceGroup, run_dir: Path, name: str, model_dir: Path) -> ReplicaProcesses:
    """A gpu_worker and its scheduler, not waited for."""
    worker_address, scheduler_address = f"unix://{run_dir}/{name}-w.sock", f"unix://{run_dir}/{name}-s.sock"
    worker = services.spawn(
        "gpu_worker", worker_address,
        ["--model-dir", str(model_dir), "--address", worker_address, "--num-kv-blocks", "64"],
    )
    scheduler = services.spawn(
        "scheduler_service", scheduler_address,
        ["--address", scheduler_address, "--worker-address", worker_address, "--policy", "gpu-only"],
    )
    return ReplicaProcesses(scheduler_address, worker, scheduler)


@dataclass
class TwoReplicaGateway:
    replicas: list[ReplicaProcesses]
    gateway: Service
    address: str
    http_url: str


@pytest.fixture(scope="module")
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="apx-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def two_replicas(default_model_dir: Path, run_dir: Path) -> Iterator[TwoReplicaGateway]:
    with ServiceGroup() as services:
        replicas = [_start_replica(services, run_dir, name, default_model_dir) for name in ("a", "b")]
        port, http_port = rpc.free_tcp_port(), rpc.free_tcp_port()
        gateway = services.start("gateway", f"127.0.0.1:{port}", [
            "--model-dir", str(default_model_dir), "--address", f"127.0.0.1:{port}",
            "--http-address", f"127.0.0.1:{http_port}",
            "--scheduler-address", ",".join(r.scheduler_address for r in replicas),
        ], timeout_s=120)
        yield TwoReplicaGateway(replicas, gateway, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")


def _sampling(i: int) -> SamplingParams:
    if i % 2:
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return SamplingParams(temperature=0.8, top_p=0.9, seed=500 + i, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(default_model_dir: Path) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    engine = LocalEngine(GpuWorkerConfig(model_dir=str(default_model_dir)))
    results = engine.generate([tokenizer.encode(p).ids for p in PROMPTS], [_sampling(i) for i in range(len(PROMPTS))])
    return [r.token_ids for r in results]


async def _generate(address: str, prompt: str, sampling: SamplingParams) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=convert.sampling_to_pb(sampling))
        ids: list[int] = []
        async for msg in gateway_pb2_grpc.GatewayStub(channel).Generate(request):
            if msg.WhichOneof("response") == "chunk":
                ids.extend(msg.chunk.token_ids)
            else:
                assert msg.complete.usage.completion_tokens == sampling.max_tokens
        return ids


def _routing(stack: TwoReplicaGateway) -> dict[str, dict]:
    data = httpx.get(f"{stack.http_url}/dashboard/data", timeout=10).json()
    return {r["address"]: r for r in data["replicas"]}


async def test_requests_are_split_across_two_replicas_and_survive_losing_one(
    two_replicas: TwoReplicaGateway, expected: list[list[int]]
) -> None:
    a, b = (r.scheduler_address for r in two_replicas.replicas)
    got = await asyncio.gather(*(_generate(two_replicas.address, p, _sampling(i)) for i, p in enumerate(PROMPTS)))
    for i, (ids, want) in enumerate(zip(got, expected, strict=True)):
        assert ids == want, f"request {i}: tokens differ from the in-process engine"
    routing = _routing(two_replicas)
    served = {address: routing[address]["completed"] for address in (a, b)}
    assert sum(served.values()) == len(PROMPTS) and all(r["in_flight"] == 0 for r in routing.values())
    assert min(served.values()) >= len(PROMPTS) // 2 - 2, f"unbalanced split: {served}"
    for address in (a, b):
        assert routing[address]["stats"]["num_steps"] > 0, f"{address} ran no iteration"

    two_replicas.replicas[1].scheduler.process.kill()  # replica b's scheduler dies without draining
    two_replicas.replicas[1].scheduler.process.wait()
    after = await asyncio.gather(*(_generate(two_replicas.address, p, _sampling(i)) for i, p in enumerate(PROMPTS[:4])))
    assert after == expected[:4], "requests sent right after losing a replica did not complete on the other"
    def marked_down() -> dict | None:
        routing = _routing(two_replicas)
        return None if routing[b]["serving"] else routing

    routing = await wait_until_async(marked_down, 5.0, "the gateway to mark the dead replica not serving",
                                     interval_s=0.1)
    assert not routing[b]["serving"] and routing[b]["stats"] is None and routing[b]["error"]
    assert routing[a]["serving"]
    assert httpx.get(f"{two_replicas.http_url}/health", timeout=10).status_code == 200
    more = await asyncio.gather(*(_generate(two_replicas.address, p, _sampling(i)) for i, p in enumerate(PROMPTS[:4])))
    assert more == expected[:4]
    final = _routing(two_replicas)
    assert final[b]["submitted"] == routing[b]["submitted"], "a NOT_SERVING replica got new requests"
    assert final[a]["completed"] == routing[a]["completed"] + 4


def test_the_gateway_refuses_replicas_of_different_models_naming_the_replica(
    two_replicas: TwoReplicaGateway, mha_model_dir: Path, default_model_dir: Path, run_dir: Path
) -> None:
    with ServiceGroup() as services:
        other = _start_replica(services, run_dir, "c", mha_model_dir)
        services.wait_serving(other.scheduler, timeout_s=120)
        a = two_replicas.replicas[0].scheduler_address
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "--model-dir", str(default_model_dir), "--address", "127.0.0.1:0",
             "--scheduler-address", f"{a},{other.scheduler_address}"],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert f"replica {other.scheduler_address} serves a different model than {a}" in done.stderr, done.stderr
