"""HTTP errors in OpenAI's shape with the right status, a message naming the problem, and no
harm to requests in flight; disconnects free the request's KV blocks."""

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from apex_serve import rpc
from apex_serve.launcher import Stack, StackConfig
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc

KEY = "sk-test-1"


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")
    config = StackConfig(
        model_dir=str(default_model_dir), port=rpc.free_tcp_port(), http_port=rpc.free_tcp_port(), run_dir=run_dir,
        api_keys=KEY,
    )
    with Stack(config) as s:
        yield s


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=f"http://{stack.config.http_address}", headers=headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return Path(stack.config.model_dir).name


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


BAD_FIELDS = [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("max_tokens", 0), ("max_tokens", 10**6),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("min_tokens", 100),
    ("logprobs", 21), ("n", 2), ("seed", -1),
    ("temperature", "hot"), ("max_tokens", "10"), ("stop", 5), ("stream", "yes"), ("logit_bias", {"1": 5.0}),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_out_of_range_or_mistyped_fields_are_400_naming_the_field(http: httpx.Client, model: str, field: str, value: object) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 4, field: value}
    error = _error(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert field in error["message"] and error["param"] == field, error


def test_malformed_json_and_missing_fields_are_400(http: httpx.Client, model: str) -> None:
    error = _error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error"
    assert _error(http.post("/v1/completions", json={"model": model}), 400)["param"] == "prompt"
    assert _error(http.post("/v1/chat/completions", json={"model": model}), 400)["param"] == "messages"
    error = _error(http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert "role" in error["message"]


def test_prompt_past_the_context_is_400_and_past_the_byte_bound_429(http: httpx.Client, model: str) -> None:
    error = _error(http.post("/v1/completions", json={"model": model, "prompt": "x" * 5000}), 400)
    assert error["param"] == "prompt" and "2047" in error["message"]
    error = _error(http.post("/v1/completions", json={"model": model, "prompt": "x" * (1 << 20 + 1)}), 429)
    assert "max_prompt_bytes" in error["message"]


def test_unknown_model_and_route_are_404(http: httpx.Client) -> None:
    error = _error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert "gpt-9" in error["message"]
    _error(http.get("/v1/nothing-here"), 404)


def test_missing_or_wrong_api_key_is_401_but_health_stays_open(stack: Stack, model: str) -> None:
    base = f"http://{stack.config.http_address}"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        error = _error(httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi"}, headers=headers), 401)
        assert "API key" in error["message"] and error["type"] == "authentication_error"
    _error(httpx.get(f"{base}/v1/models"), 401)
    assert httpx.get(f"{base}/health").status_code == 200


def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    address = f"unix://{Path(stack.config.run_dir).resolve() / 'scheduler.sock'}"
    with grpc.insecure_channel(address) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def _wait_idle(stack: Stack) -> scheduler_pb2.SchedulerStats:
    for _ in range(100):
        stats = _stats(stack)
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        time.sleep(0.05)
    return stats


def test_bad_requests_do_not_disturb_one_in_flight(stack: Stack, http: httpx.Client, model: str) -> None:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://{stack.config.http_address}", headers=http.headers, timeout=60) as c:
            long = asyncio.create_task(c.post("/v1/completions", json={
                "model": model, "prompt": "in flight", "max_tokens": 48, "ignore_eos": True, "temperature": 0.0}))
            for field, value in BAD_FIELDS:
                r = await c.post("/v1/completions", json={"model": model, "prompt": "hi", field: value})
                assert r.status_code == 400
            return await long

    done = asyncio.run(main())
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 48


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_blocks(stack: Stack, http: httpx.Client, model: str, stream: bool) -> None:
    body = {"model": model, "prompt": "leave", "max_tokens": 1500, "ignore_eos": True, "stream": stream}
    try:
        with httpx.Client(base_url=f"http://{stack.config.http_address}", headers=http.headers, timeout=1.0) as c:
            with c.stream("POST", "/v1/completions", json=body) as response:
                for _ in response.iter_lines():
                    break  # read one event (or time out on the non-streamed body), then hang up
    except httpx.ReadTimeout:
        pass
    stats = _wait_idle(stack)
    assert stats.num_running == 0 and stats.num_waiting == 0, "the abandoned request kept decoding"
    assert stats.num_free_blocks == stats.num_total_blocks
