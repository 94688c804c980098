"""POST /v1/completions: a text completion, whole or as server-sent events."""

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from gateway.generation import Generator, TextDelta
from gateway.http_api.dependencies import GeneratorDep, MetricsDep, require_api_key
from gateway.http_api.errors import generation_responses
from gateway.http_api.logprobs import completion_logprobs
from gateway.http_api.metrics import HttpMetrics
from gateway.http_api.responses import FINISH_REASONS, Completion, CompletionChoice, Usage, response_id
from gateway.http_api.schemas import CompletionRequest
from gateway.http_api.streaming import Generation, collect, sse, sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/completions", response_model=None, responses=generation_responses(Completion, Completion))
async def create_completion(
    body: CompletionRequest, request: Request, gen: GeneratorDep, metrics: MetricsDep
) -> Completion | StreamingResponse:
    completion_id = response_id("cmpl")
    wanted = body.generation_request(completion_id, gen.worker.max_model_len)
    generation = await Generation.start(request, gen, wanted)
    if body.stream:
        return sse_response(_chunks(body, generation, gen, metrics, completion_id), generation)
    done = await collect(request, generation)
    metrics.finished(done.end)
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs([lp for d in done.deltas for lp in d.logprobs], gen.token_text, 0)
    choice = CompletionChoice(
        text=done.text, logprobs=logprobs, finish_reason=FINISH_REASONS[done.end.finish_reason],
        stop_reason=done.end.stop_reason,
    )
    return Completion(id=completion_id, model=gen.model_name, choices=[choice], usage=Usage.of(done.end))


async def _chunks(
    body: CompletionRequest, generation: Generation, gen: Generator, metrics: HttpMetrics, completion_id: str
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        if usage is None and body.continuous_usage:
            usage = generation.usage()
        return sse(Completion(id=completion_id, created=created, model=gen.model_name, choices=choices, usage=usage))

    offset = 0  # text_offset counts the token texts, as the non-streamed logprobs do
    async for event in generation:
        if isinstance(event, TextDelta):
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(event.logprobs, gen.token_text, offset)
                offset += sum(len(token) for token in logprobs.tokens)
            if event.text or logprobs is not None:
                yield chunk([CompletionChoice(text=event.text, logprobs=logprobs)])
        else:
            metrics.finished(event)
            reason = FINISH_REASONS[event.finish_reason]
            yield chunk([CompletionChoice(text="", finish_reason=reason, stop_reason=event.stop_reason)])
            if body.include_usage:
                yield chunk([], Usage.of(event))
