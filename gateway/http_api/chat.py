"""POST /v1/chat/completions: the conversation through the model's chat template, whole or as
server-sent events."""

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from apex_serve.errors import InvalidArgument
from gateway.generation import Generator, TextDelta
from gateway.http_api.dependencies import GeneratorDep, MetricsDep, require_api_key
from gateway.http_api.errors import generation_responses
from gateway.http_api.logprobs import chat_logprobs
from gateway.http_api.metrics import HttpMetrics
from gateway.http_api.responses import (
    FINISH_REASONS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Usage,
    response_id,
)
from gateway.http_api.schemas import ChatCompletionRequest
from gateway.http_api.streaming import Generation, collect, sse, sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/chat/completions", response_model=None, responses=generation_responses(ChatCompletion, ChatCompletionChunk)
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, gen: GeneratorDep, metrics: MetricsDep
) -> ChatCompletion | StreamingResponse:
    completion_id = response_id("chatcmpl")
    try:
        wanted = body.generation_request(completion_id, gen.worker.max_model_len)
        generation = await Generation.start(request, gen, wanted)
    except InvalidArgument as exc:
        if exc.field == "max_tokens" and body.max_completion_tokens is not None:  # name it as the client did
            raise InvalidArgument("max_completion_tokens", str(exc).removeprefix("max_tokens: ")) from exc
        raise
    if body.stream:
        return sse_response(_chunks(body, generation, gen, metrics, completion_id), generation)
    done = await collect(request, generation)
    metrics.finished(done.end)
    logprobs = chat_logprobs([lp for d in done.deltas for lp in d.logprobs], gen.token_text) if body.logprobs else None
    choice = ChatChoice(
        message=AssistantMessage(content=done.text), logprobs=logprobs,
        finish_reason=FINISH_REASONS[done.end.finish_reason], stop_reason=done.end.stop_reason,
    )
    return ChatCompletion(id=completion_id, model=gen.model_name, choices=[choice], usage=Usage.of(done.end))


async def _chunks(
    body: ChatCompletionRequest, generation: Generation, gen: Generator, metrics: HttpMetrics, completion_id: str
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        if usage is None and body.continuous_usage:
            usage = generation.usage()
        return sse(
            ChatCompletionChunk(id=completion_id, created=created, model=gen.model_name, choices=choices, usage=usage)
        )

    yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    async for event in generation:
        if isinstance(event, TextDelta):
            logprobs = chat_logprobs(event.logprobs, gen.token_text) if body.logprobs else None
            if event.text or logprobs is not None:
                yield chunk([ChatChunkChoice(delta=ChatDelta(content=event.text), logprobs=logprobs)])
        else:
            metrics.finished(event)
            reason = FINISH_REASONS[event.finish_reason]
            yield chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=reason, stop_reason=event.stop_reason)])
            if body.include_usage:
                yield chunk([], Usage.of(event))
