"""OpenAI request bodies (plus vLLM's extra sampling fields) and their mapping to the domain.

Types are strict (a string where a number belongs is a 400, not a coercion); unknown fields are
ignored, as vLLM ignores them, except vLLM's fields that would change the output and are not served
here: those are a 400 naming them. Ranges are checked once, by SamplingParams and the Generator.
"""

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from apex_serve.errors import InvalidArgument
from apex_serve.types import MAX_LOGPROBS, SamplingParams
from gateway import validation
from gateway.chat_template import ChatOptions
from gateway.generation import GenerationRequest, samples_of
from gateway.http_api.strict import StrictBody
from gateway.http_api.structured_fields import (
    Constraint,
    JsonSchemaSpec,
    ResponseFormat,
    StructuredFields,
    StructuredOutputs,
    only_one,
)
from gateway.http_api.tools import FunctionDefinition, FunctionName, NamedToolChoice, Tool, ToolChoice, tool_constraint

# Bounds of the protobuf fields these travel in to the scheduler; the ranges that matter are checked later.
Int32 = Annotated[int, Field(le=2**31 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**32 - 1)]


class StreamOptions(StrictBody):
    include_usage: bool = False  # a last chunk with the usage
    continuous_usage_stats: bool = False  # every chunk carries the usage so far


# vLLM's fields that change the output but are not served here: a 400 names them unless absent, null or neutral.
_UNSERVED: dict[str, tuple[object, ...]] = {
    "echo": (False,),  # chat's; completions declare theirs
    "best_of": (1,),  # chat's; completions declare theirs
    "tools": ([],),  # completions'; chat declares its own
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "logits_processors": ([],),
    "use_beam_search": (False,),
}


@dataclass(frozen=True)
class Fanout:
    """The engine requests of one HTTP request, prompt i's sample j at i * samples + j. Each sample is an engine
    request of its own that prefills its prompt again: the engine shares no prefix between requests."""

    requests: tuple[GenerationRequest, ...]
    samples: int  # engine requests per prompt: best_of, else n
    n: int  # choices per prompt: the n samples of highest cumulative logprob when samples > n
    batch: bool = False  # the prompt was a list of prompts: errors name prompt[i]
    drop_generated: bool = False  # echo with max_tokens 0: one token is generated (the engine's least) and dropped

    @property
    def prompt_indexes(self) -> list[int] | None:
        return [k // self.samples for k in range(len(self.requests))] if self.batch else None


class _GenerationBody(StructuredFields):
    """Fields both endpoints share. Unknown fields are kept aside so that the unserved ones can be refused."""

    model_config = ConfigDict(strict=True, extra="allow")

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
    min_p: float = 0.0
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # only true is served
    truncate_prompt_tokens: Int32 | None = None
    prompt_logprobs: int | None = None  # each prompt token's logprob and the top k at its position
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:123"

    def _check_supported(self) -> None:
        if self.logit_bias:
            raise InvalidArgument("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidArgument("stream_options", "is only allowed with stream: true")
        if self.allowed_token_ids == []:
            raise InvalidArgument("allowed_token_ids", "must not be empty (leave it out to allow every token)")
        if not self.spaces_between_special_tokens:
            raise InvalidArgument("spaces_between_special_tokens", "only true is supported")
        for name, value in (self.model_extra or {}).items():
            if name in _UNSERVED and value is not None and value not in _UNSERVED[name]:
                raise InvalidArgument(name, "is not supported")

    def _generation_request(
        self, max_tokens: int | None, logprobs: int | None, max_model_len: int, request_id: str,
        prompt: str | list[int] = "", messages: tuple[dict[str, Any], ...] = (), prompt_logprobs: int | None = None,
        constraint: Constraint | None = None,
    ) -> GenerationRequest:
        """max_tokens None: all the context the prompt leaves (the Generator knows the prompt's length).
        constraint: the structure the output must follow."""
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
            min_p=self.min_p,
            allowed_token_ids=tuple(self.allowed_token_ids or ()),
            bad_words=tuple(self.bad_words or ()),
            skip_special_tokens=self.skip_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            prompt_logprobs=prompt_logprobs,
            structured_grammar="" if constraint is None else constraint.grammar,
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
            **({} if constraint is None else {"grammar_field": constraint.field}),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def generation_requests(
        self, request_id: str, max_model_len: int, limits: validation.RequestLimits
    ) -> Fanout:
        if self.suffix:
            raise InvalidArgument("suffix", "is not supported")
        validation.check_samples("n", self.n, limits)
        best_of = self.n if self.best_of is None else self.best_of
        validation.check_samples("best_of", best_of, limits)
        if best_of < self.n:
            raise InvalidArgument("best_of", f"must be >= n ({self.n}), got {best_of}")
        if self.stream and best_of != self.n:
            raise InvalidArgument("best_of", "is not supported with stream (the best are known only at the end)")
        prompts, batch = self._prompts()
        validation.check_batch_size(len(prompts), limits)
        drop = self.echo and self.max_tokens == 0
        # ranking best_of samples needs each token's logprob: asked for when the client did not
        logprobs = 0 if best_of > self.n and self.logprobs is None else self.logprobs
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        constraint = only_one(self.constraints())
        requests = []
        for i, prompt in enumerate(prompts):
            one = self._generation_request(
                1 if drop else self.max_tokens, logprobs, max_model_len, request_id, prompt=prompt,
                prompt_logprobs=prompt_logprobs, constraint=constraint,
            )
            requests += samples_of(one, best_of, request_id, i * best_of)
        return Fanout(tuple(requests), best_of, self.n, batch and len(prompts) > 1, drop)

    def _prompts(self) -> tuple[list[str | list[int]], bool]:
        """The prompts, and whether the request gave a list of them (a text, or one token-id list, is one)."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
            return [prompt], False  # type: ignore[list-item]
        return list(prompt), True  # type: ignore[arg-type]


class ContentPart(StrictBody):
    """A part of a message's content; only text parts are served, the others are named in a 400."""

    type: str
    text: str | None = None


class FunctionCall(StrictBody):
    name: str
    arguments: str  # JSON text


class ToolCall(StrictBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictBody):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[ToolCall] | None = None  # an assistant message: the calls it made

    def template_message(self, index: int) -> dict[str, Any]:
        """The message as the chat template takes it (unset fields None; the template drops them)."""
        return {
            "role": self.role, "content": self._text(index), "name": self.name, "tool_call_id": self.tool_call_id,
            "tool_calls": None if self.tool_calls is None else [call.model_dump() for call in self.tool_calls],
        }

    def _text(self, index: int) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise InvalidArgument(
                    f"messages[{index}].content[{j}]", f"only text parts are supported, got type {part.type!r}"
                )
            if part.text is None:
                raise InvalidArgument(f"messages[{index}].content[{j}].text", "a text part needs its text")
        return "\n".join(part.text or "" for part in self.content)  # as vLLM joins text parts


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM's chat extras, as transformers' apply_chat_template takes them
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. enable_thinking
    tools: list[Tool] | None = None  # passed to the chat template; called when tool_choice forces a call
    tool_choice: ToolChoice | None = None  # absent: auto with tools, none without

    @property
    def forced_tool_choice(self) -> ToolChoice | None:
        """tool_choice when it forces a call (required, or a named function), whose output is returned as calls."""
        return self.tool_choice if self.tools and self.tool_choice not in (None, "none", "auto") else None

    def generation_requests(
        self, request_id: str, max_model_len: int, limits: validation.RequestLimits
    ) -> Fanout:
        validation.check_samples("n", self.n, limits)
        if self.stream and self.prompt_logprobs is not None:
            raise InvalidArgument("prompt_logprobs", "is not supported with stream in chat (send it without stream)")
        request = self._chat_request(request_id, max_model_len)
        return Fanout(tuple(samples_of(request, self.n, request_id, 0)), self.n, self.n)

    def _chat_request(self, request_id: str, max_model_len: int) -> GenerationRequest:
        if not self.messages:
            raise InvalidArgument("messages", "must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs", "needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        max_tokens = self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        tool = tool_constraint(self.tools, self.tool_choice)
        if tool is not None and self.stream:
            raise InvalidArgument("stream", "is not supported with a forced tool call (tool_choice required or named)")
        constraint = only_one(self.constraints() + ([] if tool is None else [tool]))
        messages = tuple(m.template_message(i) for i, m in enumerate(self.messages))
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools or ())
        options = ChatOptions(
            self.add_generation_prompt, self.continue_final_message, self.chat_template_kwargs or {}, tools
        )
        request = self._generation_request(
            max_tokens, logprobs, max_model_len, request_id, messages=messages, prompt_logprobs=self.prompt_logprobs,
            constraint=constraint,
        )
        return replace(request, chat_options=options)


FIELD_NAMES = frozenset(
    info.alias or name for model in (
        CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, ToolCall, FunctionCall, StreamOptions,
        ResponseFormat, JsonSchemaSpec, StructuredOutputs, Tool, FunctionDefinition, NamedToolChoice, FunctionName,
    )
    for name, info in model.model_fields.items()
)
