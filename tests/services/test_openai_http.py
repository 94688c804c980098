"""The official `openai` client, unmodified, against the gateway's OpenAI-compatible HTTP API of a real stack."""

import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apex_tools.launcher import Stack
from gateway.chat_template import ChatOptions, ChatTemplate
from gateway.tokenizer import load_tokenizer

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi é"}]


def _chat_prompt_ids(model_dir: Path, messages: list[dict], options: ChatOptions | None = None) -> list[int]:
    text = ChatTemplate.from_model_dir(model_dir).render(messages, options or ChatOptions())
    return load_tokenizer(model_dir).encode(text, add_special_tokens=False).ids


def _chat_prompt_tokens(model_dir: Path, messages: list[dict]) -> int:
    return len(_chat_prompt_ids(model_dir, messages))


def test_text_completion_and_its_stream_give_the_same_greedy_text(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(model=model, prompt="Hello", max_tokens=12, **GREEDY)
    assert done.id.startswith("cmpl-") and done.object == "text_completion" and done.model == model
    assert abs(done.created - time.time()) < 60
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 12, 18)
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage, "include_usage must end with the usage"
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_completion_and_its_stream_agree(client: openai.OpenAI, model: str, default_model_dir: Path) -> None:
    done = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, **GREEDY)
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion" and done.model == model
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and choice.message.content
    assert done.usage.prompt_tokens == _chat_prompt_tokens(default_model_dir, MESSAGES)
    assert done.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage


def test_chat_without_max_tokens_may_use_all_the_context_left(
    client: openai.OpenAI, model: str, default_model_dir: Path
) -> None:
    overhead = _chat_prompt_tokens(default_model_dir, [{"role": "user", "content": ""}])
    messages = [{"role": "user", "content": "x" * (2048 - 5 - overhead)}]  # leaves 5 tokens of the 2048
    done = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5


def test_chat_roles_and_text_parts_reach_the_template(
    client: openai.OpenAI, model: str, default_model_dir: Path
) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "today?"}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=2, **GREEDY)
    # the default template knows no developer role and shows no tool fields (an assistant's tool calls are a 400)
    rendered = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather\ntoday?"},
                {"role": "tool", "content": "sunny"}]
    assert done.usage.prompt_tokens == _chat_prompt_tokens(default_model_dir, rendered)


def test_continue_final_message_goes_on_from_the_assistant_text(
    client: openai.OpenAI, model: str, default_model_dir: Path
) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    extra = {"ignore_eos": True, "add_generation_prompt": False, "continue_final_message": True}
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.0,
                                          extra_body=extra)
    ids = _chat_prompt_ids(default_model_dir, messages, ChatOptions(False, True))
    assert bytes(ids[-8:]).endswith(b"\nSure, ") and done.usage.prompt_tokens == len(ids)
    same = client.completions.create(model=model, prompt=ids, max_tokens=8, **GREEDY)
    assert done.choices[0].message.content == same.choices[0].text, "the continuation of another prompt"
    closed = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0.0,
                                            extra_body={"add_generation_prompt": False, "ignore_eos": True})
    assert closed.usage.prompt_tokens == _chat_prompt_tokens(default_model_dir, messages) - len("<|assistant|>\n")
    kwargs = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0.0,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert kwargs.usage.prompt_tokens == _chat_prompt_tokens(default_model_dir, messages)


def test_chat_field_errors_reach_the_openai_client_as_400(client: openai.OpenAI, model: str) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [image]}], max_tokens=1)
    assert err.value.param == "messages[0].content[0]" and "only text parts are supported" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert err.value.param == "continue_final_message" and "assistant" in err.value.message


def test_token_id_prompt_gives_what_the_same_text_gives(client: openai.OpenAI, model: str) -> None:
    text = client.completions.create(model=model, prompt="Hello", max_tokens=8, **GREEDY).choices[0].text
    ids = [256, *b"Hello"]  # <s> then the bytes: the default model's byte tokenizer
    assert client.completions.create(model=model, prompt=ids, max_tokens=8, **GREEDY).choices[0].text == text
    assert client.completions.create(model=model, prompt=["Hello"], max_tokens=8, **GREEDY).choices[0].text == text


def test_vllm_extras_and_seed_reach_the_sampler(client: openai.OpenAI, model: str) -> None:
    greedy = client.completions.create(model=model, prompt="Seed", max_tokens=12, **GREEDY).choices[0].text
    top1 = client.completions.create(model=model, prompt="Seed", max_tokens=12, temperature=1.0,
                                     extra_body={"top_k": 1, "ignore_eos": True}).choices[0].text
    assert top1 == greedy, "top_k=1 must sample the most likely token"
    seeded = [
        client.completions.create(model=model, prompt="Seed", max_tokens=12, temperature=1.0, seed=7,
                                  presence_penalty=0.5, frequency_penalty=0.5, user="u-1",
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.2}).choices[0].text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1], "the same seed must give the same text"


def test_logprobs_in_completions_and_chat_whole_and_streamed(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(model=model, prompt="Hi", max_tokens=5, logprobs=2, **GREEDY)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, sampled, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # greedy samples the most likely token; top holds it and the top 2, each under a name of its own
        assert top[token] == sampled and sampled == pytest.approx(max(top.values())) and sampled <= 0.0
        assert 2 <= len(top) <= 3
    chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=5, logprobs=2, stream=True, **GREEDY))
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens

    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=3, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        # the byte-level model's tokens are single bytes, or a special token's text
        assert entry.bytes == list(entry.token.encode()) if "\ufffd" not in entry.token else len(entry.bytes) == 1
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, logprobs=True, stream=True,
                                            **GREEDY)
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content])
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None, "logprobs came without being asked for"


def test_a_stop_string_ends_with_stop_and_is_not_in_the_text(client: openai.OpenAI, model: str) -> None:
    free = client.completions.create(model=model, prompt="Stop", max_tokens=30, **GREEDY).choices[0].text
    stop = next(c for c in free[3:] if c.isprintable() and c != "\ufffd")
    done = client.completions.create(model=model, prompt="Stop", max_tokens=30, stop=[stop, "never"], **GREEDY)
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text and free.startswith(choice.text)
    assert choice.model_extra["stop_reason"] == stop
    streamed = list(client.completions.create(model=model, prompt="Stop", max_tokens=30, stop=stop, stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model=model, prompt="Stop", max_tokens=30, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
                                     temperature=0.0)
    assert kept.choices[0].text == choice.text + stop
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, **GREEDY)
    chat_stop = next(c for c in chat.choices[0].message.content[2:] if c.isprintable() and c != "\ufffd")
    stopped = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, stop=chat_stop, **GREEDY)
    assert stopped.choices[0].finish_reason == "stop" and chat_stop not in stopped.choices[0].message.content


def test_models_health_and_metrics(client: openai.OpenAI, stack: Stack, model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model] and models.data[0].object == "model"
    assert client.models.retrieve(model).model_extra["max_model_len"] == 2048
    base = f"http://{stack.config.http_address}"
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    done = client.completions.create(model=model, prompt="Count me", max_tokens=3, **GREEDY)
    httpx.get(f"{base}/no/such/route")
    response = httpx.get(f"{base}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text) for s in family.samples
    }
    assert samples[("apex_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("apex_http_requests_total", (("endpoint", "unmatched"), ("status", "404")))] >= 1
    assert samples[("apex_http_prompt_tokens_total", ())] >= done.usage.prompt_tokens
    assert samples[("apex_http_generation_tokens_total", ())] >= done.usage.completion_tokens
    assert samples[("apex_requests_in_flight", ())] == 0


def test_vllm_token_fields_and_continuous_usage_through_the_openai_client(client: openai.OpenAI, model: str) -> None:
    letters = {"allowed_token_ids": [120, 121], "ignore_eos": True}  # "x" and "y"
    text = client.completions.create(model=model, prompt="Hi", max_tokens=10, temperature=1.0, seed=1,
                                     extra_body={**letters, "min_p": 0.0}).choices[0].text
    assert len(text) == 10 and set(text) <= {"x", "y"}
    banned = client.completions.create(model=model, prompt="Hi", max_tokens=10, temperature=0.0,
                                       extra_body={**letters, "bad_words": ["xy", "yx"]}).choices[0].text
    assert "xy" not in banned and "yx" not in banned and banned in ("x" * 10, "y" * 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={"min_p": 5.0})
    assert err.value.body["param"] == "min_p"
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY,
    ))
    assert all(c.usage is not None for c in chunks), "continuous_usage_stats: every chunk carries the usage"
    assert [c.usage.completion_tokens for c in chunks][-2:] == [6, 6] and chunks[-1].choices == []
