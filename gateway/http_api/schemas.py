"""OpenAI request bodies (plus vLLM's extra sampling fields) and their mapping to the domain.

Types are strict (a string where a number belongs is a 400, not a coercion); unknown fields are
ignored, as vLLM ignores them. Ranges are checked once, by SamplingParams and the Generator.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from apex_serve.errors import InvalidArgument
from apex_serve.types import MAX_LOGPROBS, SamplingParams
from gateway.generation import GenerationRequest


# Bounds of the protobuf fields these travel in to the scheduler; the ranges that matter are checked later.
Int32 = Annotated[int, Field(le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationBody(_Strict):
    """Fields both endpoints share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    # vLLM's extras
    top_k: Int32 = 0  # 0, or vLLM's -1, disables it
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False

    def _check_supported(self) -> None:
        if self.n != 1:
            raise InvalidArgument("n", f"only n=1 is supported, got {self.n}")
        if self.logit_bias:
            raise InvalidArgument("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed with stream: true")

    def _generation_request(
        self, max_tokens: int | None, logprobs: int | None, max_model_len: int, request_id: str,
        prompt: str | list[int] = "", messages: tuple[dict[str, str], ...] = (),
    ) -> GenerationRequest:
        """max_tokens None: all the context the prompt leaves (the Generator knows the prompt's length)."""
        self._check_supported()
        sampling = SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
            max_tokens=max_model_len if max_tokens is None else max_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
        )
        return GenerationRequest(
            prompt=prompt,
            messages=messages,
            sampling=sampling,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            model=self.model,
            request_id=request_id,
            fill_context=max_tokens is None,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def generation_request(self, request_id: str, max_model_len: int) -> GenerationRequest:
        if self.echo:
            raise InvalidArgument("echo", "is not supported")
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported")
        if self.best_of not in (None, 1):
            raise InvalidArgument("best_of", f"only 1 is supported, got {self.best_of}")
        prompt = self._one_prompt()
        return self._generation_request(self.max_tokens, self.logprobs, max_model_len, request_id, prompt=prompt)

    def _one_prompt(self) -> str | list[int]:
        """A text or token ids; a batch of exactly one of either is taken apart."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return prompt  # type: ignore[return-value]
        if len(prompt) != 1:
            raise InvalidArgument("prompt", f"one prompt per request is supported, got a batch of {len(prompt)}")
        return prompt[0]  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted and ignored

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM joins text parts
        return self.content or ""


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    def generation_request(self, request_id: str, max_model_len: int) -> GenerationRequest:
        if not self.messages:
            raise InvalidArgument("messages", "must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        max_tokens = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        messages = tuple({"role": m.role, "content": m.text()} for m in self.messages)
        return self._generation_request(max_tokens, logprobs, max_model_len, request_id, messages=messages)


FIELD_NAMES = frozenset(
    name for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
    for name in model.model_fields
)
