"""Chat templates render as transformers renders them, and bad conversations are named."""

import json
from pathlib import Path
from typing import Any

import pytest

from apex_serve.errors import InvalidArgument
from gateway.chat_template import ChatOptions, ChatTemplate

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A template that knows the developer role, trims contents and reads a template variable.
DEVELOPER = (
    "{% if enable_thinking is defined and not enable_thinking %}[no think]{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'developer' %}[dev]{% else %}<|{{ m['role'] }}|>{% endif %}"
    "{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A template with tool support: calls as JSON, tool results with their call id, names.
TOOLS = (
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<tool id={{ m['tool_call_id'] }}>{{ m['content'] }}</tool>"
    "{% elif m.tool_calls is defined %}<|assistant|>{% for c in m.tool_calls %}"
    "<call id={{ c.id }}>{{ c.function.name }}{{ c.function.arguments | tojson }}</call>{% endfor %}"
    "{% else %}<|{{ m['role'] }}|>{% if m.name is defined %}({{ m.name }}){% endif %}{{ m['content'] }}{% endif %}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _with_template(tmp_path: Path, model_dir: Path, source: str) -> Path:
    """A copy of the model directory whose tokenizer has `source` as its chat template."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = source
    for f in model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def _transformers(model_dir: Path, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, tokenize=False, **kwargs)


def test_renders_messages_with_special_tokens_and_the_generation_prompt() -> None:
    template = ChatTemplate(CHATML, bos_token="<s>", eos_token="</s>")
    text = template.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<|system|>be brief</s><|user|>hi</s><|assistant|>"


def test_matches_transformers_apply_chat_template(tmp_path: Path, default_model_dir: Path) -> None:
    model_dir = _with_template(tmp_path, default_model_dir, CHATML)
    messages = [{"role": "user", "content": "é€ ok"}, {"role": "assistant", "content": "yes"}]
    want = _transformers(model_dir, messages, add_generation_prompt=True)
    assert ChatTemplate.from_model_dir(model_dir).render(messages) == want


def test_a_model_without_a_template_has_none(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_model_dir(tmp_path) is None


@pytest.mark.parametrize(
    "messages,field",
    [
        ([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        ([{"role": "user", "content": "x", "tool_call_id": "c1"}], "messages[0].tool_call_id"),
        ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]}],
         "messages[0].tool_calls[0].function.arguments"),
    ],
)
def test_bad_conversations_raise_invalid_argument_naming_the_field(messages: list, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        ChatTemplate(CHATML).render(messages)
    assert err.value.field == field


def test_raise_exception_in_a_template_becomes_invalid_argument() -> None:
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(InvalidArgument, match="user first"):
        template.render([{"role": "assistant", "content": "x"}])


def test_the_default_model_template_matches_transformers(default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi é"}]
    want = AutoTokenizer.from_pretrained(default_model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ChatTemplate.from_model_dir(default_model_dir).render(messages) == want
    assert want.startswith("<s><|system|>") and want.endswith("<|assistant|>\n")


def test_a_bad_role_names_the_roles_there_are() -> None:
    with pytest.raises(InvalidArgument) as err:
        ChatTemplate(CHATML).render([{"role": "robot", "content": "x"}])
    assert str(err.value) == "messages[0].role: must be one of system, developer, user, assistant, tool, got 'robot'"


def test_developer_is_the_system_role_of_a_template_without_one(tmp_path: Path, default_model_dir: Path) -> None:
    messages = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    as_system = [{"role": "system", "content": "be brief"}, messages[1]]
    want = _transformers(default_model_dir, as_system, add_generation_prompt=True)
    assert ChatTemplate.from_model_dir(default_model_dir).render(messages) == want
    model_dir = _with_template(tmp_path, default_model_dir, DEVELOPER)
    got = ChatTemplate.from_model_dir(model_dir).render(messages)
    assert got == _transformers(model_dir, messages, add_generation_prompt=True) and got.startswith("[dev]")


def test_tool_calls_and_tool_results_reach_the_template_as_in_vllm(tmp_path: Path, default_model_dir: Path) -> None:
    model_dir = _with_template(tmp_path, default_model_dir, TOOLS)
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Zürich <1>"}'}}
    messages = [
        {"role": "user", "content": "weather?", "name": "ann", "tool_call_id": None},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    # vLLM hands the template the arguments as a mapping, and transformers drops keys without a value
    parsed = {**call, "function": {"name": "weather", "arguments": {"city": "Zürich <1>"}}}
    hf_messages = [{"role": "user", "content": "weather?", "name": "ann"}, {**messages[1], "tool_calls": [parsed]},
                   messages[2]]
    got = ChatTemplate.from_model_dir(model_dir).render(messages)
    assert got == _transformers(model_dir, hf_messages, add_generation_prompt=True)
    assert '<call id=c1>weather{"city": "Zürich <1>"}</call>' in got and "<tool id=c1>sunny</tool>" in got
    assert "<|user|>(ann)weather?" in got


@pytest.mark.parametrize("source", [None, CHATML, DEVELOPER])
def test_options_render_as_transformers_renders_them(
    tmp_path: Path, default_model_dir: Path, source: str | None
) -> None:
    model_dir = default_model_dir if source is None else _with_template(tmp_path, default_model_dir, source)
    template = ChatTemplate.from_model_dir(model_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    cases: list[tuple[ChatOptions, dict[str, Any]]] = [
        (ChatOptions(add_generation_prompt=False), {"add_generation_prompt": False}),
        (ChatOptions(add_generation_prompt=False, continue_final_message=True), {"continue_final_message": True}),
        (ChatOptions(template_kwargs={"enable_thinking": False}), {"add_generation_prompt": True,
                                                                   "enable_thinking": False}),
    ]
    for options, hf_kwargs in cases:
        assert template.render(messages, options) == _transformers(model_dir, messages, **hf_kwargs), options


def test_continue_final_message_leaves_the_last_message_open() -> None:
    template = ChatTemplate(CHATML, eos_token="</s>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, "}]
    text = template.render(messages, ChatOptions(add_generation_prompt=False, continue_final_message=True))
    assert text == "<|user|>hi</s><|assistant|>Sure, "


@pytest.mark.parametrize(
    "messages,options,field,message",
    [
        ([{"role": "assistant", "content": "x"}], ChatOptions(continue_final_message=True), "continue_final_message",
         "cannot be combined with add_generation_prompt: true"),
        ([{"role": "user", "content": "x"}], ChatOptions(add_generation_prompt=False, continue_final_message=True),
         "continue_final_message", "needs the last message to be the assistant's, got role 'user'"),
        ([{"role": "user", "content": "x"}], ChatOptions(template_kwargs={"messages": []}), "chat_template_kwargs",
         "'messages' is set by the request's own fields"),
    ],
)
def test_bad_options_raise_invalid_argument_naming_the_field(
    messages: list, options: ChatOptions, field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as err:
        ChatTemplate(CHATML).render(messages, options)
    assert err.value.field == field


def test_a_template_that_drops_the_final_message_cannot_continue_it() -> None:
    template = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}")
    options = ChatOptions(add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(InvalidArgument) as err:
        template.render([{"role": "assistant", "content": "Sure"}], options)
    assert err.value.field == "continue_final_message"
