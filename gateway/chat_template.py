"""The model's chat template (tokenizer_config.json `chat_template`), rendered with jinja2 the
way transformers renders it, without importing transformers."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from apex_serve.errors import InvalidArgument

_ROLES = ("system", "user", "assistant")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else value or ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(source)
        self._bos, self._eos = bos_token, eos_token

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

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; InvalidArgument (field `messages`) for a bad role or a template error."""
        if not messages:
            raise InvalidArgument("messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in _ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}, got {m.get('role')!r}"
                )
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self._bos, eos_token=self._eos,
            )
        except TemplateError as exc:
            raise InvalidArgument("messages", f"the chat template rejected them: {exc}") from exc
