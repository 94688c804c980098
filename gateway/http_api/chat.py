"""POST /v1/chat/completions: the conversation through the model's chat template, n samples, whole or as
server-sent events."""

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from apex_serve.errors import InvalidArgument
from apex_serve.types import FinishReason
from gateway.generation import GenerationEnd, Generator, TextDelta
from gateway.http_api.dependencies import GeneratorDep, MetricsDep, require_api_key
from gateway.http_api.errors import generation_responses
from gateway.http_api.logprobs import TokenNames, chat_logprobs, prompt_logprobs
from gateway.http_api.metrics import HttpMetrics
from gateway.http_api.responses import (
    FINISH_REASONS,
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    PromptLogprobs,
    ToolCallOut,
    Usage,
    response_id,
)
from gateway.http_api.samples import Samples
from gateway.http_api.schemas import ChatCompletionRequest
from gateway.http_api.streaming import Collected, sse, sse_response
from gateway.http_api.tools import call_id, called_functions

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/chat/completions", response_model=None, responses=generation_responses(ChatCompletion, ChatCompletionChunk)
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, gen: GeneratorDep, metrics: MetricsDep
) -> ChatCompletion | StreamingResponse:
    completion_id = response_id("chatcmpl")
    try:
        fanout = body.generation_requests(completion_id, gen.worker.max_model_len, gen.limits)
        samples = await Samples.start(request, gen, fanout.requests)
    except InvalidArgument as exc:
        if exc.field == "max_tokens" and body.max_completion_tokens is not None:  # name it as the client did
            raise InvalidArgument("max_completion_tokens", str(exc).removeprefix("max_tokens: ")) from exc
        raise
    names = TokenNames(gen.token_text, gen.token_bytes, body.return_tokens_as_token_ids)
    if body.stream:
        return sse_response(_chunks(body, samples, names, gen, metrics, completion_id), samples)
    done = await samples.collect(request)
    choices = []
    for index, d in enumerate(done):
        metrics.finished(d.end)
        logprobs = chat_logprobs([lp for x in d.deltas for lp in x.logprobs], names) if body.logprobs else None
        message, finish_reason = _message(body, d)
        choices.append(ChatChoice(
            index=index, message=message, logprobs=logprobs, finish_reason=finish_reason,
            stop_reason=d.end.stop_reason,
        ))
    usage = Usage.counts(done[0].end.prompt_tokens, sum(d.end.completion_tokens for d in done))
    return ChatCompletion(
        id=completion_id, model=gen.model_name, choices=choices, usage=usage,
        prompt_logprobs=_prompt_logprobs(body, done[0], names),
    )


def _message(body: ChatCompletionRequest, done: Collected) -> tuple[AssistantMessage, str]:
    """The assistant's message and finish reason: a forced tool call that completed is returned as tool_calls
    (content null, finish_reason tool_calls), anything else as text."""
    reason = FINISH_REASONS[done.end.finish_reason]
    choice = body.forced_tool_choice
    calls = None if choice is None or done.end.finish_reason != FinishReason.STOP else called_functions(done.text, choice)
    if calls is None:
        return AssistantMessage(content=done.text), reason
    tool_calls = [ToolCallOut(id=call_id(), function=CalledFunction(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=None, tool_calls=tool_calls), "tool_calls"


def _prompt_logprobs(body: ChatCompletionRequest, done: Collected, names: TokenNames) -> PromptLogprobs | None:
    """vLLM's, once for the conversation (every sample has the same prompt)."""
    if body.prompt_logprobs is None:
        return None
    prompt_ids = done.deltas[0].prompt_token_ids if done.deltas else done.end.prompt_token_ids
    return prompt_logprobs(prompt_ids, [lp for d in done.deltas for lp in d.prompt_logprobs], names)


async def _chunks(
    body: ChatCompletionRequest, samples: Samples, names: TokenNames, gen: Generator, metrics: HttpMetrics,
    completion_id: str,
) -> AsyncIterator[str]:
    """Each choice's chunks carry its index; each choice begins with a chunk that has the role."""
    created = int(time.time())
    num_choices = len(samples.generations)

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        if usage is None and body.continuous_usage:
            usage = samples.usage(num_choices)
        return sse(
            ChatCompletionChunk(id=completion_id, created=created, model=gen.model_name, choices=choices, usage=usage)
        )

    for index in range(num_choices):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    ends: list[GenerationEnd] = []
    async for index, event in samples.merged():
        if isinstance(event, TextDelta):
            logprobs = chat_logprobs(event.logprobs, names) if body.logprobs else None
            if event.text or logprobs is not None:
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=event.text), logprobs=logprobs)])
        else:
            metrics.finished(event)
            ends.append(event)
            reason = FINISH_REASONS[event.finish_reason]
            yield chunk([
                ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason, stop_reason=event.stop_reason)
            ])
    if body.include_usage:
        yield chunk([], Usage.counts(ends[0].prompt_tokens, sum(e.completion_tokens for e in ends)))
