"""The gateway's public gRPC API through the SDK: streaming, stop strings, abort, probes, typed
errors, cancellation that frees KV blocks, admission bounds, API keys and TLS."""

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from apex_serve import rpc
from apex_serve.sdk import (
    AsyncClient,
    Chunk,
    Client,
    Completion,
    FinishReason,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from apex_tools.launcher import Stack
from conftest import running_stack, wait_until, wait_until_async


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    with running_stack(default_model_dir, http_port=0, num_kv_blocks=64) as s:
        yield s


def _scheduler(stack: Stack) -> str:
    return f"unix://{Path(stack.config.run_dir).resolve() / 'scheduler.sock'}"


async def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    async with grpc.aio.insecure_channel(_scheduler(stack)) as channel:
        return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


async def _wait_idle(stack: Stack) -> scheduler_pb2.SchedulerStats:
    async def idle() -> scheduler_pb2.SchedulerStats | None:
        stats = await _stats(stack)
        return stats if stats.num_running == 0 and stats.num_waiting == 0 else None

    return await wait_until_async(idle, 5.0, "the scheduler to run and queue nothing", interval_s=0.05)


def test_sync_client_streams_then_completes_and_generate_gives_the_same_text(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as client:
        events = list(client.stream("Hello", temperature=0.0, max_tokens=12, ignore_eos=True))
        result = client.generate("Hello", temperature=0.0, max_tokens=12, ignore_eos=True)
    assert isinstance(events[-1], Completion) and events[-1].finish_reason is FinishReason.LENGTH
    assert all(isinstance(e, Chunk) for e in events[:-1])
    assert result.text == "".join(e.text for e in events[:-1])
    assert len(result.token_ids) == result.completion.completion_tokens == 12


async def test_async_client_matches_the_sync_client(stack: Stack) -> None:
    async with AsyncClient(stack.config.gateway_address) as client:
        result = await client.generate("Hello", temperature=0.0, max_tokens=12, ignore_eos=True)
        info = await client.model_info()
    with Client(stack.config.gateway_address) as sync:
        assert sync.generate("Hello", temperature=0.0, max_tokens=12, ignore_eos=True).token_ids == result.token_ids
    assert info.name == Path(stack.config.model_dir).name


def test_stop_string_ends_the_request_with_stop_and_no_stop_text(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as client:
        free = client.generate("Stop test", temperature=0.0, max_tokens=40, ignore_eos=True)
        stop = next(c for c in free.text[5:] if c.isprintable() and c != "\ufffd")
        result = client.generate("Stop test", temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
        kept = client.generate(
            "Stop test", temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
        )
    assert result.completion.finish_reason is FinishReason.STOP and result.completion.stop_reason == stop
    assert stop not in result.text and free.text.startswith(result.text)
    assert kept.text == result.text + stop


def test_out_of_range_fields_raise_typed_errors_naming_the_field(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as client:
        with pytest.raises(InvalidArgumentError, match="top_p"):
            client.generate("x", top_p=1.5)
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            client.generate("x", max_tokens=10**6)
        with pytest.raises(InvalidArgumentError, match="stop_token_ids"):
            client.generate("x", stop_token_ids=(10**6,))
        with pytest.raises(NotFoundError, match="nope"):
            client.generate("x", model="nope")
        with pytest.raises(NotFoundError):
            client.model_ready("nope")


def test_probes_and_server_info(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as client:
        assert client.live() and client.ready() and client.model_ready(Path(stack.config.model_dir).name)
        info = client.server_info()
    assert info.name == "apex-serve" and "abort" in info.capabilities


async def test_abort_by_request_id_ends_the_stream_and_is_idempotent(stack: Stack) -> None:
    async with AsyncClient(stack.config.gateway_address) as client:
        events = []

        async def consume() -> None:
            async for event in client.stream("abort me", request_id="abort-1", max_tokens=500, ignore_eos=True):
                events.append(event)

        task = asyncio.create_task(consume())
        await wait_until_async(lambda: events, 30.0, "the stream's first event")
        assert await client.abort("abort-1") is True
        await asyncio.wait_for(task, 10)
        assert await client.abort("abort-1") is False
    assert isinstance(events[-1], Completion) and events[-1].finish_reason is FinishReason.ABORT
    stats = await _wait_idle(stack)
    assert stats.num_free_blocks == stats.num_total_blocks


async def test_50_streams_cancelled_at_random_points_free_every_block(stack: Stack) -> None:
    before = await _stats(stack)
    rng = random.Random(7)

    async def cancel_after(client: AsyncClient, n: int) -> None:
        seen = 0
        async for event in client.stream(f"cancel {n}", max_tokens=60, ignore_eos=True, temperature=0.0):
            seen += isinstance(event, Chunk)
            if seen >= n:
                break  # closing the iterator cancels the call

    async with AsyncClient(stack.config.gateway_address) as client:
        await asyncio.gather(*(cancel_after(client, rng.randrange(1, 30)) for _ in range(50)))
    stats = await _wait_idle(stack)
    assert stats.num_running == 0 and stats.num_waiting == 0, "a cancelled request kept decoding"
    assert stats.num_free_blocks == before.num_free_blocks == stats.num_total_blocks


def _openssl_cert(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def secure_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """A second gateway on the same scheduler, with TLS and API keys."""
    key, cert = _openssl_cert(tmp_path_factory.mktemp("tls"))
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("key-1,key-2\n")
    keys.chmod(0o600)
    address = f"127.0.0.1:{rpc.free_tcp_port()}"
    proc = subprocess.Popen([
        sys.executable, "-m", "gateway", "--model-dir", stack.config.model_dir, "--address", address,
        "--http-address", "", "--scheduler-address", _scheduler(stack), "--api-keys-file", str(keys),
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
    ])
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())

        def ready() -> bool:
            assert proc.poll() is None, "the TLS gateway exited"
            with grpc.secure_channel(address, creds) as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=0.2)
                    return True
                except grpc.FutureTimeoutError:
                    return False

        wait_until(ready, 60.0, "the TLS gateway to accept connections", interval_s=0.0)
        yield address, cert.read_bytes()
    finally:
        proc.terminate()
        proc.wait(30)


def test_api_key_required_when_configured_over_tls(secure_gateway: tuple[str, bytes]) -> None:
    address, cert = secure_gateway
    with Client(address, root_certificates=cert) as client:
        with pytest.raises(UnauthenticatedError, match="API key"):
            client.generate("x", max_tokens=2)
    with Client(address, root_certificates=cert, api_key="wrong") as client:
        with pytest.raises(UnauthenticatedError):
            client.model_info()
    with Client(address, root_certificates=cert, api_key="key-2") as client:
        assert client.generate("x", max_tokens=2, ignore_eos=True).completion.completion_tokens == 2


def test_plaintext_client_cannot_talk_to_the_tls_port(secure_gateway: tuple[str, bytes]) -> None:
    address, _ = secure_gateway
    with Client(address, api_key="key-1", timeout_s=3, max_retries=0) as client:
        with pytest.raises(Exception):
            client.model_info()


async def test_requests_past_the_admission_bound_get_resource_exhausted(stack: Stack) -> None:
    address = f"127.0.0.1:{rpc.free_tcp_port()}"
    proc = subprocess.Popen([
        sys.executable, "-m", "gateway", "--model-dir", stack.config.model_dir, "--address", address,
        "--http-address", "", "--scheduler-address", _scheduler(stack), "--max-concurrent-requests", "2",
    ])
    try:
        await rpc.wait_healthy(address, timeout_s=60)
        async with AsyncClient(address) as client:
            streams = [client.stream(f"slot {i}", max_tokens=200, ignore_eos=True) for i in range(2)]
            firsts = await asyncio.gather(*(anext(s) for s in streams))
            assert all(isinstance(f, Chunk) for f in firsts)
            with pytest.raises(ResourceExhaustedError, match="max_concurrent_requests 2"):
                await client.generate("one too many", max_tokens=2)
            for s in streams:
                await s.aclose()
    finally:
        proc.terminate()
        proc.wait(30)


def test_logprobs_come_with_every_token_and_greedy_picks_the_top_one(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as client:
        result = client.generate("Logprobs", temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
        plain = client.generate("Logprobs", temperature=0.0, max_tokens=8, ignore_eos=True)
    assert [lp.token_id for lp in result.logprobs] == list(result.token_ids) == list(plain.token_ids)
    for lp in result.logprobs:
        assert len(lp.top) == 2 and lp.top[0][0] == lp.token_id and lp.top[0][1] >= lp.top[1][1]
        assert lp.logprob <= 0.0
    assert plain.logprobs == (), "logprobs were returned without being asked for"


def test_cli_chat_answers_each_line_with_the_conversation_so_far(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "chat", "--address", stack.config.gateway_address, "--max-tokens", "6",
         "--system", "be brief"],
        input="hello\nand again\n", capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    usages = [line for line in done.stderr.splitlines() if "finish_reason=" in line]
    assert len(usages) == 2, done.stderr
    first, second = (int(u.split("prompt_tokens=")[1].split()[0]) for u in usages)
    assert second > first, "the second turn must carry the first turn's history"


def test_chat_messages_over_grpc_use_the_chat_template(stack: Stack) -> None:
    from apex_serve.sdk import ChatMessage

    with Client(stack.config.gateway_address) as client:
        chat = client.generate([ChatMessage("user", "hi")], temperature=0.0, max_tokens=4, ignore_eos=True)
        with pytest.raises(InvalidArgumentError, match="role"):
            client.generate([ChatMessage("robot", "hi")], max_tokens=4)
    # "<s><|user|>\nhi</s>\n<|assistant|>\n": template bytes plus the BOS and EOS specials, no second BOS
    assert chat.completion.prompt_tokens == 1 + len("<|user|>\nhi") + 1 + len("\n<|assistant|>\n")


def test_edge_bounds_of_the_running_gateway_are_invalid_argument_naming_field_and_limit(stack: Stack) -> None:
    """The gateway process passes its configured bounds to the Generator (defaults: 16 stop strings of 1 KiB,
    1 MiB of prompt); past one is INVALID_ARGUMENT, not RESOURCE_EXHAUSTED, and nothing reaches the scheduler."""
    with Client(stack.config.gateway_address, max_retries=0) as client:
        with pytest.raises(InvalidArgumentError, match=r"stop: 17 stop strings .*max_stop_strings"):
            client.generate("x", max_tokens=1, stop=tuple(f"s{i}" for i in range(17)))
        with pytest.raises(InvalidArgumentError, match=r"stop\[0\]: .*1024 bytes \(max_stop_string_bytes\)"):
            client.generate("x", max_tokens=1, stop=("s" * 1025,))
        with pytest.raises(InvalidArgumentError, match=r"prompt: .*max_prompt_bytes"):
            client.generate("x" * ((1 << 20) + 1), max_tokens=1)
