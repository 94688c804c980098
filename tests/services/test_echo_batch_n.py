"""Completions as lm-evaluation-harness's local-completions model sends them (a batch of token-id prompts, echo,
logprobs, max_tokens 1), batched prompts, n and best_of, streamed choices with their index, token names that never
collide, chat bytes, the bounds on all of these, and n over gRPC. One stack, the `openai` client where it applies."""

import json
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from apex_serve.sdk import Client
from apex_tools.launcher import Stack

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
BOS = 256
PROMPTS = [[BOS, *b"The cat"], [BOS, *b"A dog ran"]]


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{stack.config.http_address}", timeout=60) as c:
        yield c


def _name(token: int) -> str:
    """The byte-level model's token name: its character, or its byte when that is not a character on its own."""
    return chr(token) if token < 128 else f"bytes:\\x{token:02x}"


def test_lm_eval_loglikelihood_batch_gets_prompt_logprobs_for_every_prompt_in_index_order(
    http: httpx.Client, model: str
) -> None:
    body = {"model": model, "prompt": PROMPTS, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    done = http.post("/v1/completions", json=body).json()
    assert [c["index"] for c in done["choices"]] == [0, 1]
    assert done["usage"]["prompt_tokens"] == sum(map(len, PROMPTS)) and done["usage"]["completion_tokens"] == 2
    for prompt, choice in zip(PROMPTS, done["choices"]):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, "the first prompt token has none"
        assert lp["tokens"][1 : len(prompt)] == [_name(t) for t in prompt[1:]]
        assert choice["text"].startswith(bytes(prompt[1:]).decode())
        for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert top[token] == value and value <= 0.0 and 1 <= len(top) <= 2  # the token and the top 1
        alone = http.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]["logprobs"]
        assert alone["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-4), "batched as alone"


def test_echo_with_max_tokens_0_returns_the_prompt_alone(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(model=model, prompt="Hello", max_tokens=0, echo=True, logprobs=0, **GREEDY)
    choice = done.choices[0]
    assert choice.text == "Hello" and done.usage.completion_tokens == 0 and done.usage.prompt_tokens == 6
    assert choice.logprobs.tokens == ["<s>", *"Hello"] and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.text_offset == [0, 3, 4, 5, 6, 7]


def test_echo_streamed_starts_each_choice_with_its_prompt(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt=["Hi", "Yo"], max_tokens=4, echo=True, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=["Hi", "Yo"], max_tokens=4, echo=True, stream=True,
                                            **GREEDY))
    for choice in whole.choices:
        texts = [c.choices[0].text for c in chunks if c.choices[0].index == choice.index]
        assert texts[0].startswith(["Hi", "Yo"][choice.index]) and "".join(texts) == choice.text


def test_a_batch_of_texts_is_one_choice_per_prompt_as_each_alone(client: openai.OpenAI, model: str) -> None:
    prompts = ["Hello", "Goodbye", "x"]
    done = client.completions.create(model=model, prompt=prompts, max_tokens=5, **GREEDY)
    assert [c.index for c in done.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, done.choices):
        assert choice.text == client.completions.create(model=model, prompt=prompt, max_tokens=5, **GREEDY).choices[0].text
    assert done.usage.prompt_tokens == sum(1 + len(p) for p in prompts) and done.usage.completion_tokens == 15


def test_n_samples_differ_repeat_with_the_seed_and_stream_with_their_index(client: openai.OpenAI, model: str) -> None:
    sampled = {"temperature": 1.0, "seed": 3, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    done = client.completions.create(model=model, prompt=["Hi", "Yo"], n=3, **sampled)
    assert [c.index for c in done.choices] == list(range(6)) and len({c.text for c in done.choices}) == 6
    again = client.completions.create(model=model, prompt=["Hi", "Yo"], n=3, **sampled)
    assert [c.text for c in again.choices] == [c.text for c in done.choices]
    chunks = list(client.completions.create(model=model, prompt=["Hi", "Yo"], n=3, stream=True, **sampled))
    for choice in done.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == "length"
    chat = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2,
                                               stream=True, **sampled))
    assert {c.choices[0].index for c in chat} == {0, 1}
    assert {c.choices[0].index for c in chat if c.choices[0].delta.role == "assistant"} == {0, 1}


def test_top_logprobs_name_every_token_apart_and_chat_bytes_are_the_tokens_own(
    client: openai.OpenAI, model: str
) -> None:
    done = client.completions.create(model=model, prompt="Hello", max_tokens=3, logprobs=20, **GREEDY)
    lp = done.choices[0].logprobs
    assert all(len(top) in (20, 21) for top in lp.top_logprobs), [len(top) for top in lp.top_logprobs]
    byte_names = [name for top in lp.top_logprobs for name in top if name.startswith("bytes:")]
    assert byte_names and all(re.fullmatch(r"bytes:\\x[0-9a-f]{2}", name) for name in byte_names), byte_names
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          logprobs=True, top_logprobs=20, **GREEDY)
    entries = [t for e in chat.choices[0].logprobs.content for t in e.top_logprobs]
    partial = [t for t in entries if t.token == "\ufffd"]
    assert partial and all(len(t.bytes) == 1 and t.bytes[0] >= 0x80 for t in partial), "a byte, not U+FFFD's UTF-8"
    assert all(t.bytes == list(t.token.encode()) for t in entries if t.token != "\ufffd")


BOUNDS = [
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/completions", {"best_of": 17}, "best_of"),
    ("/v1/completions", {"n": 2, "best_of": 1}, "best_of"),
    ("/v1/completions", {"best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": ["a"] * 257}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", ""]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10**6]]}, "prompt[1]"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
]


@pytest.mark.parametrize("path,fields,param", BOUNDS, ids=[p for _, _, p in BOUNDS])
def test_each_bound_is_a_400_naming_the_field(
    http: httpx.Client, model: str, path: str, fields: dict, param: str
) -> None:
    body = {"model": model, "max_tokens": 2}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
    response = http.post(path, json={**body, **fields})
    assert response.status_code == 400, response.text
    error = json.loads(response.text)["error"]
    assert error["param"] == param and param in error["message"], error


def test_grpc_n_gives_indexed_samples_that_repeat_with_the_seed(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as grpc_client:
        samples = grpc_client.samples("Hi", n=3, seed=11, temperature=1.0, max_tokens=6, ignore_eos=True)
        assert [s.completion.index for s in samples] == [0, 1, 2] and len({s.text for s in samples}) == 3
        again = grpc_client.samples("Hi", n=3, seed=11, temperature=1.0, max_tokens=6, ignore_eos=True)
        assert [s.text for s in again] == [s.text for s in samples]
        echoed = grpc_client.generate("Hi", max_tokens=1, prompt_logprobs=1)
        assert len(echoed.prompt_logprobs) == 2, "one per prompt token after <s>"
