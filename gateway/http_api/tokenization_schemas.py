"""Bodies of vLLM's /tokenize and /detokenize. Strict types, unknown fields ignored, as in schemas.py."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.http_api.schemas import ChatMessage, StrictBody


class TokenizeRequest(StrictBody):
    """vLLM's two forms in one body: the completions form (`prompt`) or the chat form (`messages`,
    rendered with the model's chat template); exactly one of the two."""

    model_config = ConfigDict(strict=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        "examples": [{"prompt": "Hello"}, {"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True}],
    })

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (such as BOS); by default true for a prompt and false for "
        "messages, whose chat template adds them.",
    )
    add_generation_prompt: bool = Field(default=True, description="Chat form: end with the assistant's turn.")
    continue_final_message: bool = Field(
        default=False, description="Chat form: leave the final (assistant) message open; needs add_generation_prompt "
        "false.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="Chat form: template variables.")
    return_token_strs: bool | None = Field(default=False, description="Also return the token strings.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="Only when return_token_strs is true.")


class DetokenizeRequest(StrictBody):
    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [{"tokens": [256, 72, 105]}]})

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


FIELD_NAMES = frozenset(name for model in (TokenizeRequest, DetokenizeRequest) for name in model.model_fields)
