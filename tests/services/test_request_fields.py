"""Every request field of vLLM's OpenAI-compatible completions and chat endpoints, as a table: `honoured` (sent,
and an effect a user would notice is checked), `refused` (a 400 whose `param` and message name it) or `n/a` (with
the reason). A field that changes the output is never silently accepted. One stack, over plain HTTP.

The stack serves the default model with a chat template that uses `add_generation_prompt` and a template variable
(`greeting`), so that the chat template fields have an effect to check. Most checks restrict generation to the
letters a-z (allowed_token_ids) so that text and token ids map one to one on the byte-level tokenizer.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from apex_tools.launcher import Stack
from conftest import running_stack

HONOURED, REFUSED, NA = "honoured", "refused", "n/a"

# field -> (status, what the test checks, or why it does not apply)
FIELD_TABLE: dict[str, tuple[str, str]] = {
    "model": (HONOURED, "another model's name is a 404"),
    "prompt": (HONOURED, "text and token-id prompts: usage.prompt_tokens and the greedy text follow the prompt"),
    "messages": (HONOURED, "another conversation changes usage.prompt_tokens and the text"),
    "max_tokens": (HONOURED, "exactly max_tokens tokens with ignore_eos, finish_reason length"),
    "max_completion_tokens": (HONOURED, "chat: wins over max_tokens"),
    "temperature": (HONOURED, "0: the same text for any seed; 1: seeds give different texts"),
    "top_p": (HONOURED, "a tiny top_p at temperature 1 gives the greedy text"),
    "top_k": (HONOURED, "top_k 1 at temperature 1 gives the greedy text; -1 is off"),
    "min_p": (HONOURED, "min_p 1 at temperature 1 gives the greedy text; 5.0 is a 400"),
    "n": (HONOURED, "n choices indexed 0..n-1, distinct at temperature 1 and repeated with the seed"),
    "best_of": (HONOURED, "completions: the n samples of highest cumulative logprob; chat: a 400"),
    "stop": (HONOURED, "the text ends before the stop string, finish_reason stop, stop_reason"),
    "stop_token_ids": (HONOURED, "the greedy first token as a stop id ends the request after it"),
    "seed": (HONOURED, "the same seed repeats a sampled text, another seed changes it"),
    "presence_penalty": (HONOURED, "changes the greedy text"),
    "frequency_penalty": (HONOURED, "changes the greedy text"),
    "repetition_penalty": (HONOURED, "changes the greedy text"),
    "logit_bias": (REFUSED, "a non-empty logit_bias"),
    "logprobs": (HONOURED, "completions: n top logprobs per token; chat: logprobs per token"),
    "top_logprobs": (HONOURED, "chat: that many top logprobs per token"),
    "echo": (HONOURED, "completions: the prompt's text before the completion; chat: a 400"),
    "suffix": (REFUSED, "a suffix"),
    "stream": (HONOURED, "server-sent chunks that join into the non-streamed text"),
    "stream_options.include_usage": (HONOURED, "a last chunk with the usage and no choices"),
    "stream_options.continuous_usage_stats": (HONOURED, "every chunk carries the usage so far"),
    "user": (NA, "an end-user id for the provider's records; it changes no output (vLLM ignores it too)"),
    "ignore_eos": (HONOURED, "with only EOS allowed: one token without it, max_tokens with it"),
    "min_tokens": (HONOURED, "a stop token id cannot end the request before min_tokens"),
    "include_stop_str_in_output": (HONOURED, "the stop string stays in the text"),
    "allowed_token_ids": (HONOURED, "only those tokens are generated; an id past the vocabulary or [] is a 400"),
    "bad_words": (HONOURED, "a word of the greedy text is never generated"),
    "skip_special_tokens": (HONOURED, "false keeps generated special tokens in the text"),
    "spaces_between_special_tokens": (REFUSED, "false (true, the default, is what is served)"),
    "truncate_prompt_tokens": (HONOURED, "usage.prompt_tokens is k, the text that of the last k tokens; 0 is a 400"),
    "prompt_logprobs": (HONOURED, "one entry per prompt token, the first null, keyed by token id"),
    "response_format": (HONOURED, "json_schema: the content is JSON that validates; a bad schema is a 400"),
    "tools": (HONOURED, "chat: a forced call names one of them; completions: a 400"),
    "tool_choice": (HONOURED, "a named function: tool_calls of it, finish_reason tool_calls; auto is a 400"),
    "guided_json": (HONOURED, "completions: the text is JSON that validates"),
    "guided_regex": (HONOURED, "the text fullmatches the regex; a bad regex is a 400"),
    "guided_choice": (HONOURED, "the text is one of the choices"),
    "guided_grammar": (HONOURED, "the text is a sentence of the Lark grammar"),
    "structured_outputs": (HONOURED, "regex: the content fullmatches; two constraints are a 400"),
    "logits_processors": (REFUSED, "a non-empty list"),
    "use_beam_search": (REFUSED, "true"),
    "return_tokens_as_token_ids": (HONOURED, "logprobs name tokens token_id:N"),
    "chat_template_kwargs": (HONOURED, "a template variable reaches the template (usage.prompt_tokens)"),
    "add_generation_prompt": (HONOURED, "false drops the assistant header (usage.prompt_tokens)"),
    "continue_final_message": (HONOURED, "the text continues the final assistant message as a raw prompt would"),
}

LETTERS = list(range(ord("a"), ord("z") + 1))
GREEDY = {"temperature": 0.0, "ignore_eos": True, "allowed_token_ids": LETTERS}
BOS, EOS = 256, 257
TEMPLATE = (
    "{{ bos_token }}{% if greeting %}{{ greeting }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with TEMPLATE as its chat template."""
    out = tmp_path_factory.mktemp("fields") / "fields-model"
    out.mkdir()
    for path in default_model_dir.iterdir():
        if path.name != "tokenizer_config.json":
            (out / path.name).symlink_to(path)
    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def stack(model_dir: Path) -> Iterator[Stack]:
    with running_stack(model_dir) as s:
        yield s


class Api:
    def __init__(self, http: httpx.Client, model: str) -> None:
        self.http = http
        self.model = model

    def post(self, path: str, **fields: Any) -> httpx.Response:
        body = {"model": self.model, **fields}
        if path == "/v1/completions":
            body.setdefault("prompt", "Hello")
        else:
            body.setdefault("messages", USER)
        body.setdefault("max_tokens", 12)
        return self.http.post(path, json=body)

    def complete(self, **fields: Any) -> dict:
        response = self.post("/v1/completions", **fields)
        assert response.status_code == 200, response.text
        return response.json()

    def text(self, **fields: Any) -> str:
        return self.complete(**fields)["choices"][0]["text"]

    def chat(self, **fields: Any) -> dict:
        response = self.post("/v1/chat/completions", **fields)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, path: str, **fields: Any) -> list[dict]:
        response = self.post(path, stream=True, **fields)
        assert response.status_code == 200, response.text
        lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]", lines[-1]
        return [json.loads(line) for line in lines[:-1]]

    def refused(self, field: str, path: str = "/v1/completions", **fields: Any) -> None:
        response = self.post(path, **fields)
        assert response.status_code == 400, f"{field}: {response.status_code} {response.text}"
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], error


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Api]:
    with httpx.Client(base_url=f"http://{stack.config.http_address}", timeout=60) as http:
        yield Api(http, Path(stack.config.model_dir).name)


@pytest.fixture(scope="module")
def greedy(api: Api) -> str:
    """The greedy letters after "Hello"."""
    text = api.text(**GREEDY)
    assert len(text) == 12 and set(text) <= set(map(chr, LETTERS)), text
    return text


CHECKS: dict[str, Callable[[Api, str], None]] = {}


def honours(field: str) -> Callable[[Callable[[Api, str], None]], Callable[[Api, str], None]]:
    def register(check: Callable[[Api, str], None]) -> Callable[[Api, str], None]:
        CHECKS[field] = check
        return check

    return register


@honours("model")
def _model(api: Api, greedy: str) -> None:
    assert api.post("/v1/completions", model="not-this-one").status_code == 404


@honours("prompt")
def _prompt(api: Api, greedy: str) -> None:
    assert api.complete(**GREEDY)["usage"]["prompt_tokens"] == 1 + len("Hello")  # <s> then the bytes
    ids = [BOS, *b"Hello"]
    assert api.text(prompt=ids, **GREEDY) == greedy and api.text(prompt=[ids], **GREEDY) == greedy
    assert api.text(prompt="Goodbye", **GREEDY) != greedy


@honours("messages")
def _messages(api: Api, greedy: str) -> None:
    one, other = api.chat(**GREEDY), api.chat(messages=[{"role": "user", "content": "hello there"}], **GREEDY)
    assert other["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"] + len("hello there") - len("hi")
    assert one["choices"][0]["message"]["content"] != other["choices"][0]["message"]["content"]


@honours("max_tokens")
def _max_tokens(api: Api, greedy: str) -> None:
    done = api.complete(max_tokens=5, **GREEDY)
    assert done["usage"]["completion_tokens"] == 5 and done["choices"][0]["finish_reason"] == "length"
    assert done["choices"][0]["text"] == greedy[:5]


@honours("max_completion_tokens")
def _max_completion_tokens(api: Api, greedy: str) -> None:
    done = api.chat(max_tokens=7, max_completion_tokens=3, **GREEDY)
    assert done["usage"]["completion_tokens"] == 3 and done["choices"][0]["finish_reason"] == "length"


@honours("temperature")
def _temperature(api: Api, greedy: str) -> None:
    assert {api.text(seed=seed, **GREEDY) for seed in (1, 2)} == {greedy}
    sampled = {api.text(seed=seed, **{**GREEDY, "temperature": 1.0}) for seed in (1, 2, 3)}
    assert len(sampled) > 1, sampled


@honours("top_p")
def _top_p(api: Api, greedy: str) -> None:
    assert {api.text(seed=seed, top_p=1e-9, **{**GREEDY, "temperature": 1.0}) for seed in (1, 2)} == {greedy}


@honours("top_k")
def _top_k(api: Api, greedy: str) -> None:
    assert {api.text(seed=seed, top_k=1, **{**GREEDY, "temperature": 1.0}) for seed in (1, 2)} == {greedy}
    assert api.text(seed=1, top_k=-1, **{**GREEDY, "temperature": 1.0}) == api.text(seed=1, **{**GREEDY,
                                                                                            "temperature": 1.0})


@honours("min_p")
def _min_p(api: Api, greedy: str) -> None:
    assert {api.text(seed=seed, min_p=1.0, **{**GREEDY, "temperature": 1.0}) for seed in (1, 2)} == {greedy}
    api.refused("min_p", min_p=5.0)
    api.refused("min_p", min_p=-0.1)


@honours("stop")
def _stop(api: Api, greedy: str) -> None:
    done = api.complete(stop=[greedy[4:6]], **GREEDY)["choices"][0]
    assert done["text"] == greedy[: greedy.index(greedy[4:6])] and done["finish_reason"] == "stop"
    assert done["stop_reason"] == greedy[4:6]


@honours("stop_token_ids")
def _stop_token_ids(api: Api, greedy: str) -> None:
    done = api.complete(stop_token_ids=[ord(greedy[0])], **GREEDY)
    assert done["usage"]["completion_tokens"] == 1 and done["choices"][0]["finish_reason"] == "stop"


@honours("seed")
def _seed(api: Api, greedy: str) -> None:
    sampled = {**GREEDY, "temperature": 1.0}
    assert api.text(seed=7, **sampled) == api.text(seed=7, **sampled)
    assert api.text(seed=7, **sampled) != api.text(seed=8, **sampled)


def _penalty(field: str, value: float) -> Callable[[Api, str], None]:
    def check(api: Api, greedy: str) -> None:
        assert api.text(max_tokens=24, **{field: value}, **GREEDY) != api.text(max_tokens=24, **GREEDY)

    return check


honours("presence_penalty")(_penalty("presence_penalty", 2.0))
honours("frequency_penalty")(_penalty("frequency_penalty", 2.0))
honours("repetition_penalty")(_penalty("repetition_penalty", 2.0))


@honours("logprobs")
def _logprobs(api: Api, greedy: str) -> None:
    logprobs = api.complete(logprobs=2, **GREEDY)["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == greedy
    assert all(t in top and 2 <= len(top) <= 3 for t, top in zip(logprobs["tokens"], logprobs["top_logprobs"]))
    content = api.chat(logprobs=True, **GREEDY)["choices"][0]["logprobs"]["content"]
    assert len(content) == 12 and all(entry["top_logprobs"] == [] for entry in content)


@honours("n")
def _n(api: Api, greedy: str) -> None:
    sampled = {**GREEDY, "temperature": 1.0}
    choices = api.complete(n=3, seed=5, **sampled)["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["text"] for c in choices}) == 3
    assert api.complete(n=3, seed=5, **sampled)["choices"] == choices, "a seed repeats every sample"
    chat = api.chat(n=2, **GREEDY)["choices"]
    assert [c["index"] for c in chat] == [0, 1] and chat[0]["message"] == chat[1]["message"], "greedy: the same"


@honours("best_of")
def _best_of(api: Api, greedy: str) -> None:
    sampled = {**GREEDY, "temperature": 1.0, "seed": 9}
    every = api.complete(n=3, logprobs=0, **sampled)["choices"]
    best = max(every, key=lambda c: sum(c["logprobs"]["token_logprobs"]))
    chosen = api.complete(best_of=3, **sampled)
    assert [c["text"] for c in chosen["choices"]] == [best["text"]] and chosen["choices"][0]["logprobs"] is None
    assert chosen["usage"]["completion_tokens"] == 36, "every sample's tokens count"
    api.refused("best_of", "/v1/chat/completions", best_of=2)


@honours("echo")
def _echo(api: Api, greedy: str) -> None:
    assert api.text(echo=True, **GREEDY) == "Hello" + greedy
    api.refused("echo", "/v1/chat/completions", echo=True)


@honours("prompt_logprobs")
def _prompt_logprobs(api: Api, greedy: str) -> None:
    entries = api.complete(prompt_logprobs=2, **GREEDY)["choices"][0]["prompt_logprobs"]
    assert len(entries) == 6 and entries[0] is None  # <s> then Hello
    for token, entry in zip(b"Hello", entries[1:]):
        ranked = sorted((e for e in entry.values() if e["rank"] is not None), key=lambda e: e["rank"])
        assert str(token) in entry and [e["rank"] for e in ranked] == [1, 2], entry
        assert ranked[0]["logprob"] >= ranked[1]["logprob"] >= min(e["logprob"] for e in entry.values())
    chat = api.chat(prompt_logprobs=0, **GREEDY)
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


@honours("return_tokens_as_token_ids")
def _return_tokens_as_token_ids(api: Api, greedy: str) -> None:
    logprobs = api.complete(logprobs=1, return_tokens_as_token_ids=True, **GREEDY)["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{ord(c)}" for c in greedy]
    content = api.chat(logprobs=True, return_tokens_as_token_ids=True, **GREEDY)["choices"][0]["logprobs"]["content"]
    assert all(entry["token"].startswith("token_id:") for entry in content)


@honours("top_logprobs")
def _top_logprobs(api: Api, greedy: str) -> None:
    content = api.chat(logprobs=True, top_logprobs=3, **GREEDY)["choices"][0]["logprobs"]["content"]
    assert len(content) == 12 and all(len(entry["top_logprobs"]) == 3 for entry in content)


@honours("stream")
def _stream(api: Api, greedy: str) -> None:
    chunks = api.stream("/v1/completions", **GREEDY)
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)


@honours("stream_options.include_usage")
def _include_usage(api: Api, greedy: str) -> None:
    chunks = api.stream("/v1/completions", stream_options={"include_usage": True}, **GREEDY)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])


@honours("stream_options.continuous_usage_stats")
def _continuous_usage_stats(api: Api, greedy: str) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        options = {"include_usage": True, "continuous_usage_stats": True}
        chunks = api.stream(path, stream_options=options, **GREEDY)
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages), f"{path}: a chunk without usage"
        assert len({u["prompt_tokens"] for u in usages}) == 1
        completion = [u["completion_tokens"] for u in usages]
        assert completion == sorted(completion) and completion[-1] == 12 and completion[-2] == 12, completion
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
        alone = api.stream(path, stream_options={"continuous_usage_stats": True}, **GREEDY)
        assert all(c["usage"] is not None and c["choices"] for c in alone), "without include_usage: no usage chunk"


@honours("ignore_eos")
def _ignore_eos(api: Api, greedy: str) -> None:
    stopped = api.complete(max_tokens=4, allowed_token_ids=[EOS], temperature=0.0)
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["choices"][0]["finish_reason"] == "stop"
    ignored = api.complete(max_tokens=4, allowed_token_ids=[EOS], temperature=0.0, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 4 and ignored["choices"][0]["finish_reason"] == "length"


@honours("min_tokens")
def _min_tokens(api: Api, greedy: str) -> None:
    done = api.complete(stop_token_ids=[ord(greedy[0])], min_tokens=4, **GREEDY)
    assert done["usage"]["completion_tokens"] >= 5 and greedy[0] not in done["choices"][0]["text"][:4]


@honours("include_stop_str_in_output")
def _include_stop_str_in_output(api: Api, greedy: str) -> None:
    stop = greedy[4:6]
    text = api.text(stop=[stop], include_stop_str_in_output=True, **GREEDY)
    assert text == greedy[: greedy.index(stop)] + stop


@honours("allowed_token_ids")
def _allowed_token_ids(api: Api, greedy: str) -> None:
    unrestricted = api.complete(temperature=0.0, ignore_eos=True, max_tokens=12, prompt=[BOS, *b"Hello"])
    assert unrestricted["choices"][0]["text"] != greedy, "the restriction changed nothing: the test proves little"
    assert set(api.text(temperature=1.0, seed=3, ignore_eos=True, allowed_token_ids=[120, 121])) <= {"x", "y"}
    api.refused("allowed_token_ids", allowed_token_ids=[1, 258])
    api.refused("allowed_token_ids", allowed_token_ids=[])


@honours("bad_words")
def _bad_words(api: Api, greedy: str) -> None:
    word = greedy[2:4]
    text = api.text(bad_words=[word], **GREEDY)
    assert word not in text and text[:3] == greedy[:3], (word, text)
    api.refused("bad_words", bad_words=[" "])


@honours("skip_special_tokens")
def _skip_special_tokens(api: Api, greedy: str) -> None:
    only_bos = {"temperature": 0.0, "ignore_eos": True, "allowed_token_ids": [BOS], "max_tokens": 3}
    skipped = api.complete(**only_bos)
    assert skipped["choices"][0]["text"] == "" and skipped["usage"]["completion_tokens"] == 3
    assert api.text(skip_special_tokens=False, **only_bos) == "<s><s><s>"
    chat = api.chat(skip_special_tokens=False, **only_bos)
    assert chat["choices"][0]["message"]["content"] == "<s><s><s>"


@honours("truncate_prompt_tokens")
def _truncate_prompt_tokens(api: Api, greedy: str) -> None:
    done = api.complete(prompt="Hello world", truncate_prompt_tokens=3, **GREEDY)
    assert done["usage"]["prompt_tokens"] == 3
    assert done["choices"][0]["text"] == api.text(prompt=list(b"rld"), **GREEDY)
    chat = api.chat(truncate_prompt_tokens=4, **GREEDY)
    assert chat["usage"]["prompt_tokens"] == 4
    api.refused("truncate_prompt_tokens", truncate_prompt_tokens=0)


@honours("chat_template_kwargs")
def _chat_template_kwargs(api: Api, greedy: str) -> None:
    plain = api.chat(**GREEDY)["usage"]["prompt_tokens"]
    greeted = api.chat(chat_template_kwargs={"greeting": "hey"}, **GREEDY)["usage"]["prompt_tokens"]
    assert greeted == plain + len("hey\n")


@honours("add_generation_prompt")
def _add_generation_prompt(api: Api, greedy: str) -> None:
    plain = api.chat(**GREEDY)["usage"]["prompt_tokens"]
    assert api.chat(add_generation_prompt=False, **GREEDY)["usage"]["prompt_tokens"] == plain - len("<|assistant|>\n")


@honours("continue_final_message")
def _continue_final_message(api: Api, greedy: str) -> None:
    messages = [*USER, {"role": "assistant", "content": "The ans"}]
    done = api.chat(messages=messages, add_generation_prompt=False, continue_final_message=True, **GREEDY)
    raw = api.complete(prompt="<|user|>\nhi</s>\n<|assistant|>\nThe ans", **GREEDY)  # <s> added by the tokenizer
    assert done["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"]
    assert done["choices"][0]["message"]["content"] == raw["choices"][0]["text"]


CHOICE_SCHEMA = {"enum": ["ok", "fine"]}  # a whole JSON value a few tokens long: no room for endless whitespace
STRUCTURED = {"temperature": 1.0, "seed": 5, "max_tokens": 40}


@honours("response_format")
def _response_format(api: Api, greedy: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": CHOICE_SCHEMA}}
    content = api.chat(response_format=fmt, **STRUCTURED)["choices"][0]["message"]["content"]
    assert json.loads(content) in CHOICE_SCHEMA["enum"], content
    fmt["json_schema"]["schema"] = {"type": "nonsense"}  # type: ignore[index]
    api.refused("response_format.json_schema.schema", "/v1/chat/completions", response_format=fmt)


@honours("guided_json")
def _guided_json(api: Api, greedy: str) -> None:
    assert json.loads(api.text(guided_json=CHOICE_SCHEMA, **STRUCTURED)) in CHOICE_SCHEMA["enum"]


@honours("guided_regex")
def _guided_regex(api: Api, greedy: str) -> None:
    text = api.text(guided_regex="[0-9]{3}x", **STRUCTURED)
    assert len(text) == 4 and text[:3].isdigit() and text[3] == "x", text
    api.refused("guided_regex", guided_regex="[0-9")


@honours("guided_choice")
def _guided_choice(api: Api, greedy: str) -> None:
    assert api.text(guided_choice=["left", "right"], **STRUCTURED) in ("left", "right")


@honours("guided_grammar")
def _guided_grammar(api: Api, greedy: str) -> None:
    assert api.text(guided_grammar='start: "ab" | "cd" "e"', **STRUCTURED) in ("ab", "cde")


@honours("structured_outputs")
def _structured_outputs(api: Api, greedy: str) -> None:
    content = api.chat(structured_outputs={"regex": "[a-c]{3}"}, **STRUCTURED)["choices"][0]["message"]["content"]
    assert len(content) == 3 and set(content) <= set("abc"), content
    api.refused("structured_outputs", structured_outputs={"regex": "a", "choice": ["a"]})


TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"side": {"enum": ["l", "r"]}}, "required": ["side"], "additionalProperties": False,
}}}


@honours("tools")
def _tools(api: Api, greedy: str) -> None:
    done = api.chat(tools=[TOOL], tool_choice="required", **{**STRUCTURED, "max_tokens": 120})
    assert [c["function"]["name"] for c in done["choices"][0]["message"]["tool_calls"]] == ["pick"], done
    api.refused("tools", tools=[TOOL])


@honours("tool_choice")
def _tool_choice(api: Api, greedy: str) -> None:
    named = {"type": "function", "function": {"name": "pick"}}
    done = api.chat(tools=[TOOL], tool_choice=named, **{**STRUCTURED, "max_tokens": 60})["choices"][0]
    (call,) = done["message"]["tool_calls"]
    assert done["finish_reason"] == "tool_calls" and done["message"]["content"] is None, done
    assert call["function"]["name"] == "pick" and json.loads(call["function"]["arguments"])["side"] in ("l", "r")
    api.refused("tool_choice", "/v1/chat/completions", tools=[TOOL], tool_choice="auto")


REFUSALS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "logit_bias": [("/v1/completions", {"logit_bias": {"97": 5.0}}),
                   ("/v1/chat/completions", {"logit_bias": {"97": 5.0}})],
    "suffix": [("/v1/completions", {"suffix": "!"})],
    "spaces_between_special_tokens": [("/v1/completions", {"spaces_between_special_tokens": False})],
    "logits_processors": [("/v1/completions", {"logits_processors": ["my.Processor"]})],
    "use_beam_search": [("/v1/completions", {"use_beam_search": True})],
}


def test_the_table_has_a_check_for_every_honoured_field_and_a_request_for_every_refused_one() -> None:
    assert set(CHECKS) == {f for f, (status, _) in FIELD_TABLE.items() if status == HONOURED}
    assert set(REFUSALS) == {f for f, (status, _) in FIELD_TABLE.items() if status == REFUSED}


@pytest.mark.parametrize("field", sorted(CHECKS))
def test_honoured_field_has_its_effect(api: Api, greedy: str, field: str) -> None:
    CHECKS[field](api, greedy)


@pytest.mark.parametrize("field", sorted(REFUSALS))
def test_refused_field_is_a_400_naming_it(api: Api, field: str) -> None:
    for path, fields in REFUSALS[field]:
        api.refused(field, path, **fields)


def test_neutral_values_of_refused_fields_and_na_fields_are_accepted(api: Api) -> None:
    neutral = {
        "n": 1, "best_of": 1, "logit_bias": {}, "echo": False, "spaces_between_special_tokens": True,
        "response_format": {"type": "text"}, "tool_choice": "none", "tools": [], "logits_processors": [],
        "use_beam_search": False, "prompt_logprobs": None, "guided_json": None, "user": "u-1",
    }
    assert api.post("/v1/chat/completions", **neutral).status_code == 200
    assert api.post("/v1/completions", suffix=None, **neutral).status_code == 200
