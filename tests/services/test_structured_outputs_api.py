"""Structured outputs through the public APIs of a real stack on the random default model: OpenAI's response_format,
vLLM's structured_outputs and guided_* fields, forced tool calls (the `openai` client) and gRPC's StructuredOutputs
(the SDK). The model's text is random, so each check is that the output follows the structure; each malformed
constraint is a 400 (INVALID_ARGUMENT) naming its field."""

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from apex_serve.sdk import Client, InvalidArgumentError, StructuredOutputs
from apex_tools.launcher import Stack

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"},
    },
    "required": ["colour", "size", "tag"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}},
            "required": ["unit", "days"], "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False,
}}}
USER = [{"role": "user", "content": "hi"}]
ROOMY = {"max_tokens": 120, "temperature": 1.0, "seed": 7}


def test_json_schema_response_format_gives_content_that_validates(client: openai.OpenAI, model: str) -> None:
    done = client.chat.completions.create(
        model=model, messages=USER, n=3, **ROOMY,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}},
    )
    for choice in done.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_object_on_completions_gives_a_json_object(client: openai.OpenAI, model: str) -> None:
    done = client.completions.create(
        model=model, prompt="Hello", max_tokens=200, temperature=0.0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(done.choices[0].text), dict)
    else:
        assert done.choices[0].text.startswith("{")


def test_guided_choice_answers_with_one_of_the_choices(client: openai.OpenAI, model: str) -> None:
    choices = ["yes", "no", "maybe later"]
    done = client.completions.create(
        model=model, prompt="Hello", n=4, **ROOMY, extra_body={"guided_choice": choices}  # type: ignore[arg-type]
    )
    assert all(c.text in choices and c.finish_reason == "stop" for c in done.choices), done.choices
    chat = client.chat.completions.create(
        model=model, messages=USER, **ROOMY,  # type: ignore[arg-type]
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert chat.choices[0].message.content in choices


def test_guided_regex_output_fullmatches(client: openai.OpenAI, model: str) -> None:
    pattern = r"[a-c]{2,5}-[0-9]{3}"
    done = client.chat.completions.create(
        model=model, messages=USER, n=3, **ROOMY, extra_body={"guided_regex": pattern}  # type: ignore[arg-type]
    )
    assert all(re.fullmatch(pattern, c.message.content or "") for c in done.choices), done.choices


def test_named_tool_choice_returns_a_call_whose_arguments_validate(client: openai.OpenAI, model: str) -> None:
    done = client.chat.completions.create(
        model=model, messages=USER, tools=[CLOCK, WEATHER], **ROOMY,  # type: ignore[arg-type,list-item]
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_required_tool_choice_returns_calls_of_the_tools(client: openai.OpenAI, model: str) -> None:
    done = client.chat.completions.create(
        model=model, messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=300,  # type: ignore[list-item]
        temperature=1.0, seed=7,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        assert call.function.name == "weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


MALFORMED: list[tuple[str, str, dict[str, Any]]] = [  # (endpoint, the field the 400 names, the request's fields)
    ("chat", "response_format.json_schema.schema",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
    ("chat", "response_format.json_schema.schema", {"response_format": {"type": "json_schema"}}),
    ("chat", "response_format.type", {"response_format": {"type": "structural_tag"}}),
    ("completions", "guided_regex", {"guided_regex": "[a-z"}),
    ("completions", "guided_json", {"guided_json": "{not json"}),
    ("completions", "guided_choice", {"guided_choice": []}),
    ("completions", "guided_grammar", {"guided_grammar": "root ::= (("}),
    ("chat", "structured_outputs", {"structured_outputs": {"regex": "a", "choice": ["a"]}}),
    ("chat", "structured_outputs.whitespace_pattern", {"structured_outputs": {"json": {}, "whitespace_pattern": " "}}),
    ("chat", "structured_outputs.json", {"structured_outputs": {"json": {"type": "object", "minProperties": "x"}}}),
    ("chat", "guided_regex", {"response_format": {"type": "json_object"}, "guided_regex": "a"}),
    ("chat", "tool_choice", {"tools": [WEATHER]}),
    ("chat", "tool_choice", {"tools": [WEATHER], "tool_choice": "auto"}),
    ("chat", "tool_choice", {"tool_choice": "required"}),
    ("chat", "tool_choice.function.name",
     {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    ("chat", "tools[0].function.parameters",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("chat", "stream", {"tools": [WEATHER], "tool_choice": "required", "stream": True}),
    ("chat", "messages[1].tool_calls", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}]}),
]


@pytest.mark.parametrize("endpoint,field,fields", MALFORMED, ids=[f"{m[0]}-{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_constraint_is_a_400_naming_its_field(
    stack: Stack, model: str, endpoint: str, field: str, fields: dict[str, Any]
) -> None:
    body: dict[str, Any] = {"model": model, "max_tokens": 4, **fields}
    if endpoint == "chat":
        body.setdefault("messages", USER)
    else:
        body["prompt"] = "Hello"
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    response = httpx.post(f"http://{stack.config.http_address}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"], error


def test_grpc_structured_outputs_constrain_the_text_and_bad_ones_are_invalid_argument(stack: Stack) -> None:
    with Client(stack.config.gateway_address) as c:
        done = c.generate(
            "Hello", structured_outputs=StructuredOutputs(json_schema=SCHEMA), max_tokens=120, temperature=1.0, seed=3
        )
        jsonschema.validate(json.loads(done.text), SCHEMA)
        choice = c.generate("Hello", structured_outputs=StructuredOutputs(choice=("up", "down")), max_tokens=20)
        assert choice.text in ("up", "down")
        with pytest.raises(InvalidArgumentError, match=r"structured_outputs\.regex"):
            c.generate("Hello", structured_outputs=StructuredOutputs(regex="(a"), max_tokens=4)
        with pytest.raises(InvalidArgumentError, match=r"sampling\.structured_grammar"):
            c.generate("Hello", structured_grammar="start: nonsense", max_tokens=4)
