"""The five services as real processes over real gRPC, checked against the in-process engine."""

import asyncio
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenizers import Tokenizer

from apex_serve import convert, rpc
from apex_serve.sdk import Client, Completion
from apex_serve.types import FinishReason, SamplingParams
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from apex_tools.launcher import Stack
from apex_tools.local_engine import LocalEngine
from conftest import prometheus_value, running_stack
from gpu_worker.config import GpuWorkerConfig

PROMPTS = [f"Request {i}: " + "the quick brown fox é€ " * (i % 5) for i in range(16)]


def _start(model_dir: Path, **overrides: object) -> Iterator[Stack]:
    with running_stack(model_dir, metrics_port=rpc.free_tcp_port(), **overrides) as stack:
        yield stack


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    yield from _start(default_model_dir)


@pytest.fixture(scope="module")
def tiny_pool_stack(default_model_dir: Path) -> Iterator[Stack]:
    yield from _start(default_model_dir, num_kv_blocks=12, policy="gpu-only")


@pytest.fixture(scope="module")
def tiny_pool_apex_stack(default_model_dir: Path) -> Iterator[Stack]:
    yield from _start(default_model_dir, num_kv_blocks=12, policy="apex")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))


def _sampling(i: int, max_tokens: int = 24) -> SamplingParams:
    if i % 2:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1000 + i, max_tokens=max_tokens, ignore_eos=True)


def _scheduler_address(stack: Stack) -> str:
    return f"unix://{Path(stack.config.run_dir).resolve() / 'scheduler.sock'}"


async def _generate(address: str, prompt: str, sampling: SamplingParams, model: str = "") -> tuple[str, list[int], gateway_pb2.GenerateComplete]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        text, ids, complete = "", [], None
        request = gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=convert.sampling_to_pb(sampling))
        async for msg in stub.Generate(request):
            kind = msg.WhichOneof("response")
            if kind == "chunk":
                assert complete is None, "a chunk arrived after the final message"
                text += msg.chunk.text
                ids.extend(msg.chunk.token_ids)
            elif kind == "complete":
                complete = msg.complete
        assert complete is not None, "the stream ended without a final message"
        return text, ids, complete


async def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    async with grpc.aio.insecure_channel(_scheduler_address(stack)) as channel:
        return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def _expected(model_dir: Path, tokenizer: Tokenizer, max_tokens: int = 24) -> list[tuple[str, list[int]]]:
    engine = LocalEngine(GpuWorkerConfig(model_dir=str(model_dir)))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    results = engine.generate(prompts, [_sampling(i, max_tokens) for i in range(len(PROMPTS))])
    return [(tokenizer.decode(r.token_ids, skip_special_tokens=True), r.token_ids) for r in results]


@pytest.fixture(scope="module")
def expected(default_model_dir: Path, tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    return _expected(default_model_dir, tokenizer)


async def test_16_concurrent_streams_match_the_in_process_engine(stack: Stack, expected: list) -> None:
    results = await asyncio.gather(
        *(_generate(stack.config.gateway_address, p, _sampling(i)) for i, p in enumerate(PROMPTS))
    )
    for i, ((text, ids, complete), (want_text, want_ids)) in enumerate(zip(results, expected, strict=True)):
        assert ids == want_ids, f"request {i}: tokens differ from the in-process engine"
        assert text == want_text, f"request {i}: streamed text differs from decoding the tokens"
        assert convert.finish_reason_from_pb(complete.finish_reason) is FinishReason.LENGTH
        assert complete.usage.completion_tokens == 24
    stats = await _stats(stack)
    assert stats.num_free_blocks == stats.num_total_blocks, "KV blocks leaked after all requests finished"


async def test_preemption_under_a_tiny_kv_pool_loses_no_request(
    tiny_pool_stack: Stack, expected: list
) -> None:
    results = await asyncio.gather(
        *(_generate(tiny_pool_stack.config.gateway_address, p, _sampling(i)) for i, p in enumerate(PROMPTS))
    )
    for i, ((_, ids, complete), (_, want_ids)) in enumerate(zip(results, expected, strict=True)):
        assert complete.usage.completion_tokens == 24, f"request {i} lost tokens"
        assert ids == want_ids, f"request {i}: tokens changed by preemption and recompute"
    stats = await _stats(tiny_pool_stack)
    assert stats.num_preemptions > 0, "the tiny pool was meant to force preemption"
    assert stats.num_free_blocks == stats.num_total_blocks


async def test_apex_spills_requests_to_the_cpu_pool_and_loses_no_token(
    tiny_pool_apex_stack: Stack, expected: list
) -> None:
    results = await asyncio.gather(
        *(_generate(tiny_pool_apex_stack.config.gateway_address, p, _sampling(i)) for i, p in enumerate(PROMPTS))
    )
    for i, ((_, ids, complete), (_, want_ids)) in enumerate(zip(results, expected, strict=True)):
        assert complete.usage.completion_tokens == 24, f"request {i} lost tokens"
        assert ids == want_ids, f"request {i}: tokens changed by running on the CPU"
    stats = await _stats(tiny_pool_apex_stack)
    assert stats.policy == "apex"
    hybrid = stats.iterations_by_mode["async_overlap"] + stats.iterations_by_mode["asym_pipeline"]
    assert hybrid > 0, f"no iteration ran CPU rows: {dict(stats.iterations_by_mode)}"
    assert any(it.cpu_rows and it.predicted_ns and it.measured_ns for it in stats.recent_iterations)
    assert stats.cost_model_error, "no prediction error was recorded"
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks > 0
    assert stats.num_finished == len(PROMPTS) and stats.generation_tokens == 24 * len(PROMPTS)
    with_cpu = [it for it in stats.recent_iterations if it.cpu_rows]
    assert all(it.overlap.cpu_attention_ns > 0 and 0.0 <= it.overlap.hidden_ratio <= 1.0 for it in with_cpu)
    timeline = stats.latest_timeline
    assert timeline.step_id % 16 == 0 and timeline.subtasks, "no sampled iteration's timeline (every 16th)"
    assert all(timeline.start_unix_ns - 5_000_000 <= s.start_unix_ns <= s.end_unix_ns for s in timeline.subtasks)


def test_apex_stack_exports_prometheus_metrics_of_the_requests_and_iterations(tiny_pool_apex_stack: Stack) -> None:
    """Runs after the spill test: its 16 requests are in the counters."""
    url = f"http://{tiny_pool_apex_stack.config.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    assert prometheus_value(text, "apex_time_to_first_token_seconds_count") >= len(PROMPTS)
    assert prometheus_value(text, "apex_e2e_request_latency_seconds_count") >= len(PROMPTS)
    assert prometheus_value(text, "apex_request_queue_time_seconds_count") >= len(PROMPTS)
    assert prometheus_value(text, "apex_inter_token_latency_seconds_count") >= 23 * len(PROMPTS)
    assert prometheus_value(text, "apex_generation_tokens_total") >= 24 * len(PROMPTS)
    assert prometheus_value(text, 'apex_request_success_total{finished_reason="length"}') >= len(PROMPTS)
    assert prometheus_value(text, 'apex_iterations_total{mode="async_overlap"}') > 0
    assert prometheus_value(text, "apex_iteration_overlap_ratio_count") > 0
    assert 0 < prometheus_value(text, "apex_cpu_attention_hidden_seconds_total") <= prometheus_value(
        text, "apex_cpu_attention_seconds_total")
    assert prometheus_value(text, 'apex_kv_cache_usage_perc{pool="cpu"}') == 0.0  # all finished: the pools are free
    assert 'apex_cost_model_mape{mode="async_overlap"}' in text
    assert prometheus_value(text, "apex_num_requests_running") == 0


BAD_REQUESTS = [
    ("prompt", dict(prompt=""), {}),
    ("prompt", dict(prompt="x" * 5000), {}),
    ("max_tokens", dict(prompt="hi"), dict(max_tokens=0)),
    ("max_tokens", dict(prompt="hi"), dict(max_tokens=100000)),
    ("temperature", dict(prompt="hi"), dict(temperature=-0.5)),
    ("top_p", dict(prompt="hi"), dict(top_p=0.0)),
    ("top_p", dict(prompt="hi"), dict(top_p=1.5)),
    ("top_k", dict(prompt="hi"), dict(top_k=-1)),
]


async def test_bad_input_is_invalid_argument_naming_the_field_and_spares_requests_in_flight(
    stack: Stack,
) -> None:
    long_running = asyncio.create_task(
        _generate(stack.config.gateway_address, "in flight", SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    )
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for field, fields, sampling in BAD_REQUESTS:
            request = gateway_pb2.GenerateRequest(**fields)
            for key, value in sampling.items():
                setattr(request.sampling, key, value)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(request):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, fields, sampling)
            assert field in err.value.details(), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(gateway_pb2.GenerateRequest(model="no-such-model", prompt="hi")):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in err.value.details()
    _, _, complete = await long_running
    assert complete.usage.completion_tokens == 64, "a bad request disturbed the request in flight"


async def test_every_service_answers_health_and_reflection(stack: Stack) -> None:
    run_dir = Path(stack.config.run_dir).resolve()
    addresses = {
        "apex_serve.v1.Gateway": stack.config.gateway_address,
        "apex_serve.v1.Scheduler": f"unix://{run_dir / 'scheduler.sock'}",
        "apex_serve.v1.GpuWorker": f"unix://{run_dir / 'gpu_worker.sock'}",
        "apex_serve.v1.CpuAttentionWorker": f"unix://{run_dir / 'cpu_attention_worker.sock'}",
        "apex_serve.v1.Profiler": f"unix://{run_dir / 'profiler.sock'}",
    }
    for service, address in addresses.items():
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for r in stream for s in r.list_services_response.service]
            assert service in names and "grpc.health.v1.Health" in names, (service, names)


def test_cli_generate_streams_text_from_the_stack(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "generate", "Hello", "--address", stack.config.gateway_address,
         "--max-tokens", "8"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "finish_reason=" in done.stderr
    assert done.stdout.strip(), "no text was streamed"


def test_apex_serve_up_reports_ready_then_ctrl_c_drains_in_flight_requests_and_stops_cleanly(
    default_model_dir: Path,
) -> None:
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")
    port = rpc.free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apex_tools", "up", "--model-dir", str(default_model_dir), "--port", str(port),
         "--http-port", str(rpc.free_tcp_port()), "--run-dir", run_dir],
        stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "apex-serve ready" in line:
                break
        assert any(f"127.0.0.1:{port}" in line and "ready" in line for line in lines), "".join(lines)
        with Client(f"127.0.0.1:{port}") as client:
            stream = client.stream("drain me", temperature=0.0, max_tokens=48, ignore_eos=True)
            events = [next(stream)]  # the request is in flight
            proc.send_signal(signal.SIGINT)
            events.extend(stream)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + rest
    final = events[-1]
    assert isinstance(final, Completion) and final.finish_reason is FinishReason.LENGTH, events[-1]
    assert final.completion_tokens == 48, "the in-flight request was cut short instead of drained"
    assert "stopped" in rest
    assert not Path(run_dir).exists(), "socket directory left behind"


async def test_a_cancelled_stream_aborts_the_request_and_frees_its_blocks(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        sampling = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
        call = stub.Generate(gateway_pb2.GenerateRequest(prompt="cancel me", sampling=convert.sampling_to_pb(sampling)))
        async for msg in call:
            if msg.WhichOneof("response") == "chunk":
                break
        call.cancel()
    for _ in range(50):
        stats = await _stats(stack)
        if stats.num_running == 0:
            break
        await asyncio.sleep(0.1)
    assert stats.num_running == 0 and stats.num_waiting == 0, "the cancelled request kept decoding"
    assert stats.num_free_blocks == stats.num_total_blocks, "the cancelled request's KV blocks were not freed"
