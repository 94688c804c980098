"""The model's chat template (tokenizer_config.json `chat_template`), rendered with jinja2 the
way transformers' `apply_chat_template` renders it, without importing transformers."""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from apex_serve.errors import InvalidArgument

ROLES = ("system", "developer", "user", "assistant", "tool")
# Variables the request sets through its own fields, never through chat_template_kwargs.
_RESERVED = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of the end of the final message


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation is rendered, as transformers' apply_chat_template and vLLM take it."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the final (assistant) message open, for the model to go on
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra template variables
    tools: tuple[Mapping[str, Any], ...] = ()  # function tools, {"type": "function", "function": {...}} each


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' filter: JSON without jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else value or ""


def _template_message(i: int, message: Mapping[str, Any], developer_role: str) -> dict[str, Any]:
    """The message as the template sees it: keys without a value dropped (as transformers drops them),
    `developer` as the template names it, tool-call arguments parsed (as vLLM parses them)."""
    role = message.get("role")
    if role not in ROLES:
        raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    out = {k: v for k, v in message.items() if v is not None}
    if role == "developer":
        out["role"] = developer_role
    if "tool_calls" in out:
        if role != "assistant":
            raise InvalidArgument(f"messages[{i}].tool_calls", f"only assistant messages carry them, not {role}")
        out["tool_calls"] = [_parsed_call(i, j, call) for j, call in enumerate(out["tool_calls"])]
    if "tool_call_id" in out and role != "tool":
        raise InvalidArgument(f"messages[{i}].tool_call_id", f"only tool messages carry it, not {role}")
    return out


def _parsed_call(i: int, j: int, call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call["function"])
    arguments = function.get("arguments") or "{}"
    if not isinstance(arguments, str):
        return {**call, "function": function}
    try:
        function["arguments"] = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"messages[{i}].tool_calls[{j}].function.arguments", f"is not JSON: {exc}") from exc
    return {**call, "function": function}


def _check_options(messages: Sequence[Mapping[str, Any]], options: ChatOptions) -> None:
    reserved = next((k for k in _RESERVED if k in options.template_kwargs), None)
    if reserved is not None:
        raise InvalidArgument("chat_template_kwargs", f"{reserved!r} is set by the request's own fields, not here")
    if options.continue_final_message:
        if options.add_generation_prompt:
            raise InvalidArgument(
                "continue_final_message", "cannot be combined with add_generation_prompt: true (set it to false)"
            )
        if messages[-1].get("role") != "assistant":
            raise InvalidArgument(
                "continue_final_message",
                f"needs the last message to be the assistant's, got role {messages[-1].get('role')!r}",
            )


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._bos, self._eos = bos_token, eos_token
        # OpenAI's newer name for system, for templates that know no developer role
        self._developer_role = "developer" if re.search(r"""["']developer["']""", source) else "system"
        self._renders_tool_calls = "tool_calls" in source

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The model's template, or None when its tokenizer_config.json has none."""
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: Sequence[Mapping[str, Any]], options: ChatOptions = ChatOptions()) -> str:
        """The prompt text; InvalidArgument naming the field for a bad message, a bad option or a
        template error."""
        if not messages:
            raise InvalidArgument("messages", "must not be empty")
        chat = [_template_message(i, m, self._developer_role) for i, m in enumerate(messages)]
        if not self._renders_tool_calls:
            _check_no_tool_calls(chat)
        _check_options(messages, options)
        final = str(chat[-1].get("content", "")) if options.continue_final_message else ""
        if options.continue_final_message:
            chat[-1]["content"] = final + _CONTINUE_TAG
        variables = {"bos_token": self._bos, "eos_token": self._eos, **options.template_kwargs}
        try:
            text = self._template.render(
                variables, messages=chat, tools=list(options.tools) or None, documents=None,
                add_generation_prompt=options.add_generation_prompt,
            )
        except TemplateError as exc:
            raise InvalidArgument("messages", f"the chat template rejected them: {exc}") from exc
        return _continued(text, final) if options.continue_final_message else text


def _check_no_tool_calls(chat: Sequence[Mapping[str, Any]]) -> None:
    """A template that never reads tool_calls would drop an assistant's calls from the conversation unseen."""
    at = next((i for i, m in enumerate(chat) if m.get("tool_calls")), None)
    if at is not None:
        raise InvalidArgument(
            f"messages[{at}].tool_calls", "the model's chat template does not render tool calls"
        )


def _continued(text: str, final: str) -> str:
    """The rendering cut right after the final message's text, as transformers cuts it."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise InvalidArgument(
            "continue_final_message", "the chat template does not keep the final message as sent, so it cannot go on"
        )
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
