"""Bounds at the gateway's edge, checked before any expensive work, with the right codes on HTTP and gRPC:
stop strings, chat messages and prompt bytes are 400 / INVALID_ARGUMENT naming the field and the limit; text that is
not UTF-8 is a 400 naming the field; a malformed protobuf is INVALID_ARGUMENT without an ERROR log; a body past the
bound is a 413 in OpenAI's shape; idle half-open HTTP connections cannot starve /health; repeated warnings are
logged once per interval. In process, over a scheduler that answers one token."""

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from apex_serve import rpc
from apex_serve.types import WorkerInfo
from apex_serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer, RepeatFilter
from gateway.replicas import Replica, Replicas
from gateway.server import create_server
from gateway.servicer import GatewayServicer
from one_token_scheduler import OneTokenScheduler

WORKER = WorkerInfo(
    model_name="edge", num_layers=1, vocab_size=258, max_model_len=4096, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)
LIMITS = {
    "max_prompt_bytes": 1000, "max_stop_strings": 3, "max_stop_string_bytes": 8, "max_bad_words": 2,
    "max_chat_messages": 4,
}


class Edge:
    def __init__(self, http: HttpServer, grpc_address: str, scheduler: OneTokenScheduler) -> None:
        self.http = http
        self.url = f"http://127.0.0.1:{http.port}"
        self.grpc_address = grpc_address
        self.scheduler = scheduler


@pytest.fixture
async def edge(default_model_dir: Path) -> AsyncIterator:
    started: list[tuple[HttpServer, grpc.aio.Server]] = []

    async def start(**config: object) -> Edge:
        gateway = GatewayConfig(
            model_dir=str(default_model_dir), http_address="127.0.0.1:0", **{**LIMITS, **config}  # type: ignore[arg-type]
        )
        scheduler = OneTokenScheduler()
        generator = Generator.for_config(
            gateway, WORKER, Replicas([Replica("edge", scheduler)]), "edge"  # type: ignore[arg-type]
        )
        server = create_server(gateway)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(generator), server)
        address = rpc.bind(server, "127.0.0.1:0")
        await server.start()
        http = HttpServer(generator, gateway)
        await http.start()
        started.append((http, server))
        return Edge(http, address, scheduler)

    yield start
    for http, server in started:
        await http.stop()
        await server.stop(None)


def _completion(**fields: object) -> dict:
    return {"model": "edge", "prompt": "hi", "max_tokens": 1, **fields}


def _chat(*contents: str, **fields: object) -> dict:
    messages = [{"role": "user", "content": c} for c in contents]
    return {"model": "edge", "messages": messages, "max_tokens": 1, **fields}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# (body, the field named, the limit named); each past LIMITS
HTTP_BOUNDS = [
    ("/v1/completions", _completion(stop=["a", "b", "c", "d"]), "stop", "max_stop_strings"),
    ("/v1/completions", _completion(stop=["ok", "123456789"]), "stop[1]", "max_stop_string_bytes"),
    ("/v1/completions", _completion(stop="123456789"), "stop[0]", "max_stop_string_bytes"),
    ("/v1/completions", _completion(prompt="x" * 1001), "prompt", "max_prompt_bytes"),
    ("/v1/completions", _completion(prompt="é" * 501), "prompt", "max_prompt_bytes"),  # 1002 bytes, 501 characters
    ("/v1/chat/completions", _chat("a", "b", "c", "d", "e"), "messages", "max_chat_messages"),
    ("/v1/chat/completions", _chat("x" * 600, "y" * 600), "messages", "max_prompt_bytes"),
    ("/v1/chat/completions", _chat("hi", stop=["a"] * 4), "stop", "max_stop_strings"),
    ("/v1/completions", _completion(bad_words=["a", "b", "c"]), "bad_words", "max_bad_words"),
    ("/v1/completions", _completion(bad_words=["ok", "123456789"]), "bad_words[1]", "max_stop_string_bytes"),
]


@pytest.mark.parametrize("path,body,field,limit", HTTP_BOUNDS)
async def test_each_bound_is_400_naming_the_field_and_the_limit_over_http(edge, path, body, field, limit) -> None:
    e = await edge()
    async with httpx.AsyncClient(base_url=e.url, timeout=10) as c:
        error = _error(await c.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == field, error
    assert limit in error["message"] and str(LIMITS[limit]) in error["message"], error
    assert e.scheduler.submitted == 0


GRPC_BOUNDS = [
    ({"prompt": "hi", "stop": ["a", "b", "c", "d"]}, "stop", "max_stop_strings"),
    ({"prompt": "hi", "stop": ["123456789"]}, "stop[0]", "max_stop_string_bytes"),
    ({"prompt": "x" * 1001}, "prompt", "max_prompt_bytes"),
    ({"messages": [gateway_pb2.ChatMessage(role="user", content="m")] * 5}, "messages", "max_chat_messages"),
    ({"messages": [gateway_pb2.ChatMessage(role="user", content="x" * 600)] * 2}, "messages", "max_prompt_bytes"),
    ({"prompt": "hi", "sampling": common_pb2.SamplingParams(max_tokens=1, bad_words=["a", "b", "c"])}, "bad_words",
     "max_bad_words"),
]


@pytest.mark.parametrize("fields,field,limit", GRPC_BOUNDS)
async def test_each_bound_is_invalid_argument_naming_the_field_and_the_limit_over_grpc(
    edge, fields, field, limit
) -> None:
    e = await edge()
    async with grpc.aio.insecure_channel(e.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(**{"sampling": common_pb2.SamplingParams(max_tokens=1), **fields})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    details = info.value.details() or ""
    assert details.startswith(f"{field}: ") and limit in details and str(LIMITS[limit]) in details, details
    assert e.scheduler.submitted == 0


async def test_a_grpc_request_message_past_the_body_bound_is_resource_exhausted_before_it_is_read(edge) -> None:
    e = await edge()
    async with grpc.aio.insecure_channel(e.grpc_address, options=rpc.CHANNEL_OPTIONS) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GenerateRequest(prompt="x" * (2 << 20), sampling=common_pb2.SamplingParams(max_tokens=1))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request):
                pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    assert e.scheduler.submitted == 0


async def test_requests_at_the_bounds_are_served(edge) -> None:
    e = await edge()
    async with httpx.AsyncClient(base_url=e.url, timeout=10) as c:
        ok = await c.post("/v1/completions", json=_completion(prompt="x" * 1000, stop=["a", "b", "12345678"]))
        assert ok.status_code == 200, ok.text
        ok = await c.post("/v1/chat/completions", json=_chat("a", "b", "c", "d"))
        assert ok.status_code == 200, ok.text
    assert e.scheduler.submitted == 2


# a lone surrogate, as JSON's "\ud800" escape carries it (json.dumps writes it so)
SURROGATE = [
    ("/v1/completions", _completion(prompt="a\ud800"), "prompt"),
    ("/v1/completions", _completion(model="\ud800"), "model"),
    ("/v1/completions", _completion(stop=["\ud800"]), "stop"),
    ("/v1/chat/completions", _chat("\ud800"), "messages[0].content"),
    ("/v1/chat/completions", _chat("fine", "x\udfff"), "messages[1].content"),
    ("/v1/chat/completions", _chat("hi", model="\ud800"), "model"),
]


@pytest.mark.parametrize("path,body,field", SURROGATE)
async def test_text_that_is_not_utf8_is_400_naming_the_field(edge, path, body, field) -> None:
    e = await edge()
    async with httpx.AsyncClient(base_url=e.url, timeout=10) as c:
        response = await c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        error = _error(response, 400)
        assert error["param"] == field and "not valid UTF-8" in error["message"], error
        assert (await c.get("/health")).status_code == 200  # the connection and the server are fine
    assert e.scheduler.submitted == 0


async def test_garbage_protobuf_is_invalid_argument_without_an_error_log(edge, caplog) -> None:
    e = await edge()
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(e.grpc_address) as channel:
        broken = (b"\xff\xff\xff\xff", b"\x0a\x05\xc3")  # a bad tag, a cut string
        for method, call, garbages in (
            ("/apex_serve.v1.Gateway/Generate", channel.unary_stream, (*broken, b"\x12\x02\xff\xfe")),  # bad UTF-8
            ("/apex_serve.v1.Gateway/GetModelInfo", channel.unary_unary, broken),
        ):
            raw = call(method, request_serializer=None, response_deserializer=None)
            for garbage in garbages:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    result = raw(garbage)
                    if method.endswith("Generate"):
                        async for _ in result:
                            pass
                    else:
                        await result
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, garbage, info.value)
                assert "request" in (info.value.details() or "")
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, [r.getMessage() for r in errors]
    assert e.scheduler.submitted == 0


async def test_a_prompt_past_the_bound_is_400_and_the_openai_client_does_not_retry(edge) -> None:
    e = await edge()
    seen: list[int] = []

    async def count(response: httpx.Response) -> None:
        seen.append(response.status_code)

    http_client = httpx.AsyncClient(event_hooks={"response": [count]})
    async with openai.AsyncOpenAI(base_url=f"{e.url}/v1", api_key="none", http_client=http_client, max_retries=3) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.completions.create(model="edge", prompt="x" * 1001, max_tokens=1)
    assert info.value.status_code == 400 and seen == [400], seen
    assert "max_prompt_bytes" in str(info.value)


async def test_a_body_past_the_bound_is_413_in_openai_shape(edge) -> None:
    e = await edge(max_prompt_bytes=1000)  # body bound: 8 x 1000 + 1 MiB
    big = _completion(prompt="x" * (2 << 20))
    async with httpx.AsyncClient(base_url=e.url, timeout=10) as c:
        error = _error(await c.post("/v1/completions", json=big), 413)
        assert "request body" in error["message"] and "max_prompt_bytes" in error["message"], error

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while it is read
            yield b'{"model": "edge", "prompt": "'
            for _ in range(4):
                yield b"x" * (1 << 20)
            yield b'"}'

        response = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        _error(response, 413)
    assert e.scheduler.submitted == 0


async def test_half_open_connections_do_not_starve_health(edge) -> None:
    e = await edge(max_http_connections=50, http_header_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", e.http.port))
            await loop.sock_sendall(s, b"GET /v1/mod")  # half a request line, then nothing
            held.append(s)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=e.url, timeout=5) as c:
            assert (await c.get("/health")).status_code == 200
        assert time.monotonic() - started < 2.0
        open_now = len(e.http._server.server_state.connections)
        assert open_now <= 50, open_now
        await asyncio.sleep(1.5)  # past the head timeout: every half-open connection is closed
        assert len(e.http._server.server_state.connections) == 0
    finally:
        for s in held:
            s.close()


def test_repeated_warnings_are_logged_once_per_interval(caplog) -> None:
    log = logging.getLogger("test_edge_bounds.repeats")
    log.addFilter(repeat := RepeatFilter(interval_s=0.2))
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            for _ in range(100):
                log.warning("Invalid HTTP request received.")
            log.warning("another kind %s", 1)
            time.sleep(0.25)
            log.warning("Invalid HTTP request received.")
        messages = [r.getMessage() for r in caplog.records if r.name == log.name]
        assert messages[:2] == ["Invalid HTTP request received.", "another kind 1"], messages
        assert len(messages) == 3, messages
        assert messages[2].startswith("Invalid HTTP request received. (99 more like it"), messages
    finally:
        log.removeFilter(repeat)
