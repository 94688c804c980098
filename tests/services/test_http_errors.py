"""HTTP errors in OpenAI's shape with the right status, type and a message and param naming the field;
no harm to a request in flight; disconnects free the request's KV blocks. A stack with API keys,
plus an in-process server over a scripted scheduler for admission, failures and shutdown."""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from apex_serve import rpc
from apex_serve.types import WorkerInfo
from apex_serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from apex_tools.launcher import Stack
from conftest import running_stack, wait_until, wait_until_async
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api.server import HttpServer
from gateway.replicas import Replica, Replicas
from gateway.servicer import GatewayServicer

KEY = "sk-test-1"


@pytest.fixture(scope="module")
def stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"other-key\n{KEY}\n")
    keys.chmod(0o600)
    with running_stack(default_model_dir, api_keys_file=str(keys)) as s:
        yield s


@pytest.fixture(scope="module")
def base_url(stack: Stack) -> str:
    return f"http://{stack.config.http_address}"


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return Path(stack.config.model_dir).name


def error_of(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind, error
    return error


def _completion(model: str, **fields: object) -> dict:
    return {"model": model, "prompt": "hi", "max_tokens": 4, **fields}


def _chat(model: str, **fields: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


COMPLETION_FIELDS = [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2**40), ("max_tokens", 0),
    ("max_tokens", 10**6), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.5), ("min_tokens", 100), ("min_tokens", -1), ("logprobs", 21), ("logprobs", -1),
    ("seed", -1), ("n", 17), ("n", 0), ("best_of", 0), ("best_of", 17), ("echo", "yes"), ("suffix", "tail"),
    ("logit_bias", {"1": 5.0}), ("prompt_logprobs", 21),
    ("stop", [""]),
    # wrong JSON types
    ("temperature", "hot"), ("max_tokens", "10"), ("max_tokens", 4.5), ("stream", "yes"), ("stop", 5),
    ("logprobs", True), ("ignore_eos", 1), ("seed", 1.5), ("prompt", 5), ("prompt", [1.5]), ("model", 7),
    ("stream_options", {"include_usage": True}),  # without stream: true
]


@pytest.mark.parametrize("field,value", COMPLETION_FIELDS)
def test_completions_field_out_of_range_or_mistyped_is_400_naming_it(
    http: httpx.Client, model: str, field: str, value: object
) -> None:
    body = {**_completion(model), field: value}
    error = error_of(http.post("/v1/completions", json=body), 400, "invalid_request_error")
    assert error["param"] == field and field in error["message"], error


CHAT_FIELDS = [
    ("top_logprobs", 2, {}), ("top_logprobs", 21, {"logprobs": True}), ("logprobs", 3, {}),
    ("max_completion_tokens", 0, {}), ("max_tokens", 10**6, {}), ("n", 17, {}), ("temperature", -0.1, {}),
    ("messages", [], {}), ("messages", "hi", {}), ("messages[0].role", [{"role": "robot", "content": "x"}], {}),
    ("messages[0].role", [{"content": "x"}], {}), ("messages[0].content", [{"role": "user", "content": 5}], {}),
    ("messages[0].content[0]", [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], {}),
    ("messages[0].content[0].text", [{"role": "user", "content": [{"type": "text"}]}], {}),
    ("messages[0].tool_calls", [{"role": "user", "content": "x", "tool_calls": []}], {}),
    ("stream_options.include_usage", {"include_usage": "yes"}, {"stream": True}),
    ("continue_final_message", True, {}), ("continue_final_message", True, {"add_generation_prompt": False}),
    ("add_generation_prompt", "no", {}), ("chat_template_kwargs", ["x"], {}),
    ("chat_template_kwargs", {"add_generation_prompt": False}, {}),
]


@pytest.mark.parametrize("param,value,extra", CHAT_FIELDS)
def test_chat_field_out_of_range_or_mistyped_is_400_naming_it(
    http: httpx.Client, model: str, param: str, value: object, extra: dict
) -> None:
    field = param.split("[")[0].split(".")[0]
    body = {**_chat(model), field: value, **extra}
    error = error_of(http.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    assert error["param"] == param and param in error["message"], error


def test_a_non_text_content_part_is_400_saying_only_text_parts_are_supported(http: httpx.Client, model: str) -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]
    body = _chat(model, messages=[{"role": "system", "content": "x"}, {"role": "user", "content": parts}])
    error = error_of(http.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    assert error["param"] == "messages[1].content[1]"
    assert error["message"] == "messages[1].content[1]: only text parts are supported, got type 'image_url'"


def test_unsupported_fields_at_their_defaults_are_accepted(http: httpx.Client, model: str) -> None:
    body = _completion(model, n=1, best_of=1, echo=False, suffix=None, logit_bias={}, user="u-1", stream=False)
    assert http.post("/v1/completions", json=body).status_code == 200
    parts = [{"type": "text", "text": "hi"}]
    body = _chat(model, messages=[{"role": "user", "content": parts, "name": "me"}], n=1, user="u-1", top_k=-1)
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_malformed_json_and_missing_fields_are_400(http: httpx.Client, model: str) -> None:
    error = error_of(
        http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}),
        400, "invalid_request_error",
    )
    assert "malformed JSON" in error["message"] and error["param"] is None
    error = error_of(http.post("/v1/completions", json=["not", "an", "object"]), 400, "invalid_request_error")
    assert error["param"] is None
    for path, body, missing in [
        ("/v1/completions", {"model": model}, "prompt"),
        ("/v1/completions", {"prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"model": model}, "messages"),
    ]:
        error = error_of(http.post(path, json=body), 400, "invalid_request_error")
        assert error["param"] == missing and missing in error["message"], error


def test_prompt_past_the_context_or_the_byte_bound_is_400(http: httpx.Client, model: str) -> None:
    for prompt, named in (("x" * 5000, "2047"), ([65] * 2048, "2047"), ([65, 9999], "9999")):
        response = http.post("/v1/completions", json=_completion(model, prompt=prompt))
        error = error_of(response, 400, "invalid_request_error")
        assert error["param"] == "prompt" and named in error["message"], error
    too_big = _completion(model, prompt="x" * ((1 << 20) + 1))
    error = error_of(http.post("/v1/completions", json=too_big), 400, "invalid_request_error")
    assert error["param"] == "prompt" and "max_prompt_bytes" in error["message"], error
    too_big = _chat(model, messages=[{"role": "user", "content": "x" * (1 << 20)}])
    error = error_of(http.post("/v1/chat/completions", json=too_big), 400, "invalid_request_error")
    assert error["param"] == "messages" and "max_prompt_bytes" in error["message"], error


def test_unknown_model_route_and_method_are_404_and_405(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/completions", json=_completion("gpt-9")), 404, "not_found_error")
    assert "gpt-9" in error["message"]
    error = error_of(http.post("/v1/chat/completions", json=_chat("gpt-9")), 404, "not_found_error")
    assert "gpt-9" in error["message"]
    assert "gpt-9" in error_of(http.get("/v1/models/gpt-9"), 404, "not_found_error")["message"]
    assert "/v1/nothing-here" in error_of(http.get("/v1/nothing-here"), 404, "not_found_error")["message"]
    error_of(http.get("/v1/completions"), 405, "invalid_request_error")


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                                     {"authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_api_key_is_401_on_every_v1_endpoint(base_url: str, model: str, headers: dict) -> None:
    with httpx.Client(base_url=base_url, headers=headers) as c:
        for response in (
            c.post("/v1/completions", json=_completion(model)),
            c.post("/v1/chat/completions", json=_chat(model)),
            c.get("/v1/models"),
            c.get(f"/v1/models/{model}"),
        ):
            error = error_of(response, 401, "authentication_error")
            assert "API key" in error["message"] and error["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"


def test_health_and_metrics_stay_open_and_every_configured_key_works(base_url: str, model: str) -> None:
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/metrics").status_code == 200
    other = httpx.get(f"{base_url}/v1/models", headers={"authorization": "Bearer other-key"})
    assert other.status_code == 200 and other.json()["data"][0]["id"] == model


def _idle_stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    """The scheduler's stats once nothing runs or waits (or after 5 s)."""
    address = f"unix://{Path(stack.config.run_dir).resolve() / 'scheduler.sock'}"
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        def idle() -> scheduler_pb2.SchedulerStats | None:
            stats = stub.GetStats(scheduler_pb2.GetStatsRequest())
            return stats if stats.num_running == 0 and stats.num_waiting == 0 else None

        return wait_until(idle, 5.0, "the scheduler to run and queue nothing", interval_s=0.05)


def test_bad_requests_do_not_disturb_one_in_flight(base_url: str, model: str) -> None:
    async def main() -> tuple[httpx.Response, list[int]]:
        headers = {"authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as c:
            body = _completion(model, prompt="in flight", max_tokens=48, ignore_eos=True, temperature=0.0)
            long = asyncio.create_task(c.post("/v1/completions", json=body))
            statuses = [
                (await c.post("/v1/completions", json={**_completion(model), field: value})).status_code
                for field, value in COMPLETION_FIELDS
            ]
            return await long, statuses

    done, statuses = asyncio.run(main())
    assert set(statuses) == {400}
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 48, done.text


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_client_that_disconnects_aborts_its_request_and_frees_its_blocks(
    stack: Stack, base_url: str, model: str, stream: bool
) -> None:
    body = _completion(model, prompt="leave", max_tokens=1500, ignore_eos=True, stream=stream)
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first event, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=1.0)  # gives up waiting and closes the connection
    stats = _idle_stats(stack)
    assert stats.num_running == 0 and stats.num_waiting == 0, "the abandoned request kept decoding"
    assert stats.num_free_blocks == stats.num_total_blocks, "the abandoned request's KV blocks were not freed"


# -- in process: HttpServer over a scripted scheduler -------------------------------------------------

Script = list[scheduler_pb2.SubmitResponse | float | Exception]  # a message, a pause (s), or a failure
WORKER = WorkerInfo(
    model_name="scripted", num_layers=1, vocab_size=258, max_model_len=64, eos_token_ids=(257,), block_size=16,
    num_kv_blocks=8, device="cpu", dtype="float32",
)


def unavailable(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def token(token_id: int, n: int, finish: int | None = None) -> scheduler_pb2.SubmitResponse:
    """The n-th output token; with finish, the last one."""
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=n, total_tokens=3 + n)
    return scheduler_pb2.SubmitResponse(
        token_ids=[token_id], finished=finish is not None, finish_reason=finish or 0, usage=usage
    )


class ScriptedScheduler:
    """Stands in for the scheduler stub: every Submit plays the script, then ends the stream after a finished
    message (as the scheduler does) or hangs until cancelled."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.submitted = 0
        self.cancelled = 0

    def Submit(self, request: scheduler_pb2.SubmitRequest) -> "ScriptedCall":
        self.submitted += 1
        return ScriptedCall(self)


class ScriptedCall:
    def __init__(self, scheduler: ScriptedScheduler) -> None:
        self._scheduler = scheduler

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        for step in self._scheduler.script:
            if isinstance(step, Exception):
                raise step
            if isinstance(step, float):
                await asyncio.sleep(step)
            else:
                yield step
                if step.finished:
                    return
        await asyncio.Event().wait()

    def cancel(self) -> bool:
        self._scheduler.cancelled += 1
        return True


@pytest.fixture
async def scripted(default_model_dir: Path) -> AsyncIterator:
    servers: list[HttpServer] = []

    async def start(script: Script, **config: object) -> tuple[HttpServer, Generator, ScriptedScheduler, str]:
        gateway = GatewayConfig(model_dir=str(default_model_dir), http_address="127.0.0.1:0", **config)
        scheduler = ScriptedScheduler(script)
        generator = Generator.for_config(
            gateway, WORKER, Replicas([Replica("scripted", scheduler)]), "scripted"  # type: ignore[arg-type]
        )
        server = HttpServer(generator, gateway)
        await server.start()
        servers.append(server)
        return server, generator, scheduler, f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()


def _scripted_body(**fields: object) -> dict:
    return {"model": "scripted", "prompt": "hi", "max_tokens": 8, **fields}


async def test_requests_past_max_concurrent_requests_get_429_until_a_slot_frees(scripted) -> None:
    _, generator, scheduler, url = await scripted([token(65, 1)], max_concurrent_requests=1)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        async with c.stream("POST", "/v1/completions", json=_scripted_body(stream=True)) as first:
            lines = first.aiter_lines()  # held: a dropped line iterator closes the connection
            assert '"text":"A"' in await anext(lines)
            error = error_of(await c.post("/v1/completions", json=_scripted_body()), 429, "rate_limit_error")
            assert "max_concurrent_requests" in error["message"]
            error_of(await c.post("/v1/chat/completions", json=_chat("scripted")), 429, "rate_limit_error")
        # the first client hung up: its request is aborted and its slot freed
        await wait_until_async(lambda: generator.num_active == 0, 5.0, "the hung-up request's slot to be freed")
        assert scheduler.cancelled == scheduler.submitted == 1 and generator.num_active == 0
        async with c.stream("POST", "/v1/completions", json=_scripted_body(stream=True)) as again:
            assert again.status_code == 200


async def test_a_scheduler_that_does_not_answer_is_503_on_health_and_before_any_output(scripted) -> None:
    _, generator, _, url = await scripted([unavailable("gone")])
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        assert (await c.get("/health")).status_code == 200
        for path, body in (("/v1/completions", _scripted_body()), ("/v1/chat/completions", _chat("scripted"))):
            error = error_of(await c.post(path, json=body), 503, "service_unavailable_error")
            assert "UNAVAILABLE" in error["message"] and "gone" in error["message"]
        generator.replicas.replicas[0].serving = False  # what its health watch does when it goes away
        error_of(await c.get("/health"), 503, "service_unavailable_error")
        error = error_of(await c.post("/v1/completions", json=_scripted_body()), 503, "service_unavailable_error")
        assert "no scheduler replica is SERVING" in error["message"]


async def test_a_failure_after_the_first_event_is_an_error_event_then_done(scripted) -> None:
    _, generator, _, url = await scripted([token(65, 1), RuntimeError("engine fell over")])
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        async with c.stream("POST", "/v1/completions", json=_scripted_body(stream=True)) as response:
            events = [line async for line in response.aiter_lines() if line]
        error_of(await c.post("/v1/completions", json=_scripted_body()), 500, "server_error")
    assert '"text":"A"' in events[0]
    assert json.loads(events[1].removeprefix("data: "))["error"]["type"] == "server_error"
    assert events[2:] == ["data: [DONE]"] and generator.num_active == 0


async def test_stop_lets_a_request_in_flight_finish_within_the_drain(scripted) -> None:
    script = [token(65, 1), 0.3, token(66, 2, common_pb2.FINISH_REASON_LENGTH)]
    server, _, scheduler, url = await scripted(script, drain_timeout_s=5.0)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        request = asyncio.create_task(c.post("/v1/completions", json=_scripted_body()))
        await wait_until_async(lambda: scheduler.submitted, 10.0, "the request to reach the scheduler")
        await server.stop()
        done = await request
        with pytest.raises(httpx.ConnectError):
            await c.post("/v1/completions", json=_scripted_body())
    assert done.status_code == 200 and done.json()["choices"][0]["text"] == "AB"


async def test_stop_cancels_a_request_past_the_drain_and_aborts_it(scripted, caplog: pytest.LogCaptureFixture) -> None:
    server, generator, scheduler, url = await scripted([token(65, 1)], drain_timeout_s=0.2)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        async with c.stream("POST", "/v1/chat/completions", json=_chat("scripted", stream=True)) as response:
            lines = response.aiter_lines()
            while '"content":"A"' not in await anext(lines):
                pass
            started = time.monotonic()
            stopping = asyncio.create_task(server.stop())
            rest = [line async for line in lines if line]
            await stopping
    assert time.monotonic() - started < 2.0, "stop waited past the drain timeout"
    assert len(rest) == 2, f"the cut stream should end with an error event and [DONE], got {rest}"
    error = json.loads(rest[0].removeprefix("data: "))["error"]
    assert error["type"] == "service_unavailable_error" and "drain" in error["message"]
    assert rest[1] == "data: [DONE]"
    assert scheduler.cancelled == 1 and generator.num_active == 0, "the cancelled request was not aborted"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an expected cut was logged as an error"


async def test_stop_answers_a_non_streaming_request_past_the_drain_with_503(scripted) -> None:
    server, generator, scheduler, url = await scripted([token(65, 1)], drain_timeout_s=0.2)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        request = asyncio.create_task(c.post("/v1/completions", json=_scripted_body()))
        await wait_until_async(lambda: generator.num_active, 10.0, "the request to be in flight")
        await server.stop()
        error = error_of(await request, 503, "service_unavailable_error")
    assert "drain" in error["message"]
    assert scheduler.cancelled == 1 and generator.num_active == 0


async def test_grpc_generate_past_the_drain_ends_unavailable_and_aborts_it(scripted) -> None:
    _, generator, scheduler, _ = await scripted([token(65, 1)])
    servicer = GatewayServicer(generator)
    server = rpc.create_server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = rpc.bind(server, "127.0.0.1:0").rpartition(":")[2]
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=8))
            )
            first = await anext(aiter(call))
            assert first.chunk.text == "A"
            started = time.monotonic()
            await servicer.drain.cut_after(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for message in call:
                    pytest.fail(f"the cut stream went on: {message}")
    finally:
        await server.stop(None)
    assert cut.value.code() is grpc.StatusCode.UNAVAILABLE and "drain" in (cut.value.details() or "")
    assert time.monotonic() - started < 2.0
    assert scheduler.cancelled == 1 and generator.num_active == 0, "the cut request was not aborted"


async def test_a_body_far_past_max_prompt_bytes_is_413_before_it_is_read(scripted) -> None:
    _, _, scheduler, url = await scripted([token(65, 1)], max_prompt_bytes=1000)
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        response = await c.post("/v1/completions", json=_scripted_body(prompt="x" * (2 << 20)))
    error = error_of(response, 413, "invalid_request_error")
    assert "max_prompt_bytes" in error["message"] and scheduler.submitted == 0
