"""What the clients send and yield, and the one place they meet protobuf."""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from apex_serve import convert
from apex_serve.sdk.errors import InvalidArgumentError, error_for, status_code
from apex_serve.types import FinishReason, SamplingParams, TokenLogprob
from apex_serve.v1 import gateway_pb2


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str  # the function's name
    arguments: str  # JSON text


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, developer, user, assistant or tool
    content: str
    name: str = ""
    tool_call_id: str = ""  # role tool: the call this answers
    tool_calls: tuple[ToolCall, ...] = ()  # role assistant: the calls it made


@dataclass(frozen=True)
class ChatOptions:
    """How the server renders a conversation, as transformers' apply_chat_template takes it."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the final (assistant) message open; needs no generation prompt
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra template variables (JSON values)


@dataclass(frozen=True)
class StructuredOutputs:
    """The structure the output must follow: exactly one of the fields. A constraint that does not compile is an
    InvalidArgumentError naming it (structured_outputs.json_schema, ...)."""

    json_schema: str | Mapping[str, Any] | None = None  # a JSON schema, as JSON text or an object
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it
    choice: Sequence[str] | None = None  # the output is exactly one of the strings
    grammar: str | None = None  # a Lark or GBNF grammar

    def to_pb(self) -> gateway_pb2.StructuredOutputs:
        set_fields = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        set_fields += ["json_object"] if self.json_object else []
        if len(set_fields) != 1:
            raise InvalidArgumentError(
                grpc.StatusCode.INVALID_ARGUMENT, f"structured_outputs: needs exactly one constraint, got {set_fields}"
            )
        if self.json_schema is not None:
            schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(dict(self.json_schema))
            return gateway_pb2.StructuredOutputs(json_schema=schema)
        if self.choice is not None:
            return gateway_pb2.StructuredOutputs(choice=gateway_pb2.StructuredOutputs.Choices(choices=list(self.choice)))
        if self.regex is not None:
            return gateway_pb2.StructuredOutputs(regex=self.regex)
        if self.grammar is not None:
            return gateway_pb2.StructuredOutputs(grammar=self.grammar)
        return gateway_pb2.StructuredOutputs(json_object=True)


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0  # the sample (n)
    # with sampling.prompt_logprobs, on a sample's first chunk: one per prompt token after the first
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    request_id: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str | None = None
    index: int = 0  # the sample (n)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: tuple[int, ...]
    completion: Completion
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


def generate_request(
    prompt: str | Sequence[ChatMessage],
    sampling: SamplingParams,
    stop: Sequence[str],
    include_stop_str_in_output: bool,
    model: str,
    request_id: str,
    chat: ChatOptions | None = None,
    n: int = 1,
    structured_outputs: StructuredOutputs | None = None,
) -> gateway_pb2.GenerateRequest:
    msg = gateway_pb2.GenerateRequest(
        model=model,
        n=n,
        sampling=convert.sampling_to_pb(sampling),
        request_id=request_id,
        stop=list(stop),
        include_stop_str_in_output=include_stop_str_in_output,
    )
    if structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_outputs.to_pb())
    if isinstance(prompt, str):
        if chat is not None:
            raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "chat: needs a list of ChatMessage")
        msg.prompt = prompt
        return msg
    msg.messages.extend(_chat_message_to_pb(m) for m in prompt)
    if chat is not None:
        msg.chat.CopyFrom(_chat_options_to_pb(chat))
    return msg


def _chat_message_to_pb(m: ChatMessage) -> gateway_pb2.ChatMessage:
    return gateway_pb2.ChatMessage(
        role=m.role, content=m.content, name=m.name, tool_call_id=m.tool_call_id,
        tool_calls=[gateway_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
    )


def _chat_options_to_pb(chat: ChatOptions) -> gateway_pb2.ChatOptions:
    try:
        kwargs = json.dumps(dict(chat.chat_template_kwargs)) if chat.chat_template_kwargs else ""
    except TypeError as exc:
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"chat.chat_template_kwargs: {exc}") from exc
    return gateway_pb2.ChatOptions(
        add_generation_prompt=chat.add_generation_prompt, continue_final_message=chat.continue_final_message,
        chat_template_kwargs=kwargs,
    )


def parse_response(msg: gateway_pb2.GenerateResponse) -> Chunk | Completion:
    """A chunk or the completion; a server-sent `error` message raises like a status would."""
    kind = msg.WhichOneof("response")
    if kind == "chunk":
        c = msg.chunk
        return Chunk(
            c.text, tuple(c.token_ids), tuple(convert.logprob_from_pb(lp) for lp in c.logprobs), c.index,
            tuple(convert.logprob_from_pb(lp) for lp in c.prompt_logprobs),
        )
    if kind == "complete":
        c = msg.complete
        return Completion(
            c.request_id, convert.finish_reason_from_pb(c.finish_reason, "complete.finish_reason"),
            c.usage.prompt_tokens, c.usage.completion_tokens, c.stop_reason or None, c.index,
        )
    raise error_for(status_code(msg.error.code), msg.error.message)


def collect(events: Sequence[Chunk | Completion]) -> GenerateResult:
    """The one sample of a stream (n = 1)."""
    (result,) = collect_samples(events)
    return result


def collect_samples(events: Sequence[Chunk | Completion]) -> list[GenerateResult]:
    """Each sample's result, in index order."""
    results = []
    for index in sorted({e.index for e in events}):
        chunks = [e for e in events if isinstance(e, Chunk) and e.index == index]
        (completion,) = [e for e in events if isinstance(e, Completion) and e.index == index]
        results.append(GenerateResult(
            "".join(c.text for c in chunks),
            tuple(t for c in chunks for t in c.token_ids),
            completion,
            tuple(lp for c in chunks for lp in c.logprobs),
            tuple(lp for c in chunks for lp in c.prompt_logprobs),
        ))
    return results


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    dtype: str
    device: str


@dataclass(frozen=True)
class ServerInfo:
    name: str
    version: str
    capabilities: tuple[str, ...]


def model_info_from_pb(msg: gateway_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.name, msg.max_model_len, msg.vocab_size, msg.dtype, msg.device)


def server_info_from_pb(msg: gateway_pb2.ServerInfo) -> ServerInfo:
    return ServerInfo(msg.name, msg.version, tuple(msg.capabilities))
