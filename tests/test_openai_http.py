"""The official `openai` client, unmodified, against the gateway's OpenAI-compatible HTTP API."""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from apex_serve import rpc
from apex_serve.launcher import Stack, StackConfig


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")
    config = StackConfig(
        model_dir=str(default_model_dir), port=rpc.free_tcp_port(), http_port=rpc.free_tcp_port(), run_dir=run_dir
    )
    with Stack(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"http://{stack.config.http_address}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    return Path(stack.config.model_dir).name


def test_text_completion_and_its_stream_give_the_same_greedy_text(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 6
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12, "include_usage must end the stream with the usage"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion_and_its_stream_agree(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.0,
                                          extra_body={"ignore_eos": True})
    assert done.choices[0].message.role == "assistant" and done.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.0,
                                            stream=True, extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == done.choices[0].message.content


def test_logprobs_in_completions_and_chat(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0.0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for top, sampled in zip(lp.top_logprobs, lp.token_logprobs):
        # greedy picks the most likely token (texts of invalid single bytes may collide as keys)
        assert 1 <= len(top) <= 2 and sampled >= max(top.values()) - 1e-6 and sampled <= 0.0
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0.0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)


def test_a_stop_string_ends_with_stop_and_is_not_in_the_text(client: openai.OpenAI, model: str) -> None:
    free = client.completions.create(model=model, prompt="Stop", max_tokens=30, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(c for c in free[3:] if c.isprintable() and c != "\ufffd")
    done = client.completions.create(model=model, prompt="Stop", max_tokens=30, temperature=0.0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "stop" and stop not in done.choices[0].text
    assert free.startswith(done.choices[0].text)


def test_models_health_and_metrics(client: openai.OpenAI, stack: Stack, model: str) -> None:
    assert [m.id for m in client.models.list().data] == [model]
    base = f"http://{stack.config.http_address}"
    assert httpx.get(f"{base}/health").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert "apex_generation_tokens_total" in metrics and "apex_http_requests_total" in metrics
