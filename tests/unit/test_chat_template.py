"""Chat templates render as transformers renders them, and bad conversations are named."""

import json
from pathlib import Path

import pytest

from apex_serve.errors import InvalidArgument
from gateway.chat_template import ChatTemplate

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_renders_messages_with_special_tokens_and_the_generation_prompt() -> None:
    template = ChatTemplate(CHATML, bos_token="<s>", eos_token="</s>")
    text = template.render([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<|system|>be brief</s><|user|>hi</s><|assistant|>"


def test_matches_transformers_apply_chat_template(tmp_path: Path, default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    for f in default_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "é€ ok"}, {"role": "assistant", "content": "yes"}]
    want = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.from_model_dir(tmp_path).render(messages) == want


def test_a_model_without_a_template_has_none(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert ChatTemplate.from_model_dir(tmp_path) is None


@pytest.mark.parametrize(
    "messages,field",
    [([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role")],
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
