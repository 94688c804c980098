"""The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from gateway.auth import UNAUTHENTICATED_MESSAGE, key_accepted
from gateway.config import GatewayConfig
from gateway.generation import GenerationEnd, GenerationRequest, Generator, TextDelta
from gateway.http_api import responses
from gateway.http_api.errors import install_error_handlers
from gateway.http_api.metrics import CountRequests, HttpMetrics
from gateway.http_api.schemas import ChatCompletionRequest, CompletionRequest

Event = TextDelta | GenerationEnd
DISCONNECT_POLL_S = 0.25


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _started(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """Runs the stream to its first event, so bad input raises before a response starts."""
    first = await anext(events)

    async def rest() -> AsyncIterator[Event]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # a client that went away aborts the request here

    return rest()


async def _collect(request: Request, events: AsyncIterator[Event]) -> list[Event]:
    """All events of a non-streamed request; aborts it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(_drain(events))
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")
    return task.result()


async def _drain(events: AsyncIterator[Event]) -> list[Event]:
    try:
        return [event async for event in events]
    finally:
        await events.aclose()


def create_app(gen: Generator, config: GatewayConfig) -> FastAPI:
    app = FastAPI(title="apex-serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = HttpMetrics(gen)
    app.add_middleware(CountRequests, metrics=metrics)
    install_error_handlers(app)
    keys = config.api_key_set

    async def authorize(authorization: str | None = Header(default=None)) -> None:
        if not key_accepted(keys, authorization):
            raise HTTPException(401, UNAUTHENTICATED_MESSAGE)

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await gen.ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        card = {"id": gen.model_name, "object": "model", "created": 0, "owned_by": "apex-serve",
                "max_model_len": gen.worker.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        request_id = uuid.uuid4().hex
        events = await _started(gen.stream(GenerationRequest(
            prompt=body.prompt_value(), sampling=body.sampling(body.max_tokens, body.logprobs), stop=body.stops(),
            include_stop_str_in_output=body.include_stop_str_in_output, model=body.model, request_id=request_id,
        )))
        rid, want_logprobs = f"cmpl-{request_id}", body.logprobs is not None

        def choice(text: str, logprobs: Any, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                offset = 0
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        lps = responses.completion_logprobs(gen, list(ev.logprobs), offset) if want_logprobs else None
                        offset += len(ev.text)
                        yield _sse(responses.envelope("text_completion", rid, gen.model_name, [choice(ev.text, lps, None)]))
                    else:
                        metrics.finished(ev)
                        final = choice("", None, responses.FINISH[ev.finish_reason])
                        yield _sse(responses.envelope("text_completion", rid, gen.model_name, [final]))
                        if body.stream_options and body.stream_options.include_usage:
                            yield _sse({**responses.envelope("text_completion", rid, gen.model_name, []),
                                        "usage": responses.usage(ev)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        collected = await _collect(request, events)
        end = collected[-1]
        assert isinstance(end, GenerationEnd)
        metrics.finished(end)
        deltas = [e for e in collected if isinstance(e, TextDelta)]
        lps = responses.completion_logprobs(gen, [lp for d in deltas for lp in d.logprobs], 0) if want_logprobs else None
        text = "".join(d.text for d in deltas)
        body_out = responses.envelope("text_completion", rid, gen.model_name,
                                      [choice(text, lps, responses.FINISH[end.finish_reason])])
        return JSONResponse({**body_out, "usage": responses.usage(end)})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        request_id = uuid.uuid4().hex
        logprobs = body.chat_logprobs()
        events = await _started(gen.stream(GenerationRequest(
            prompt="", messages=tuple({"role": m.role, "content": m.text()} for m in body.messages),
            sampling=body.sampling(body.chat_max_tokens(), logprobs), stop=body.stops(),
            include_stop_str_in_output=body.include_stop_str_in_output, model=body.model, request_id=request_id,
        )))
        rid = f"chatcmpl-{request_id}"

        def lp_body(deltas: list[TextDelta]) -> Any:
            return responses.chat_logprobs(gen, [lp for d in deltas for lp in d.logprobs]) if logprobs is not None else None

        if body.stream:
            async def sse() -> AsyncIterator[str]:
                def chunk(delta: dict[str, Any], lps: Any, finish: str | None) -> str:
                    choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}
                    return _sse(responses.envelope("chat.completion.chunk", rid, gen.model_name, [choice]))

                yield chunk({"role": "assistant", "content": ""}, None, None)
                async for ev in events:
                    if isinstance(ev, TextDelta):
                        yield chunk({"content": ev.text}, lp_body([ev]), None)
                    else:
                        metrics.finished(ev)
                        yield chunk({}, None, responses.FINISH[ev.finish_reason])
                        if body.stream_options and body.stream_options.include_usage:
                            yield _sse({**responses.envelope("chat.completion.chunk", rid, gen.model_name, []),
                                        "usage": responses.usage(ev)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        collected = await _collect(request, events)
        end = collected[-1]
        assert isinstance(end, GenerationEnd)
        metrics.finished(end)
        deltas = [e for e in collected if isinstance(e, TextDelta)]
        message = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        choice = {"index": 0, "message": message, "logprobs": lp_body(deltas),
                  "finish_reason": responses.FINISH[end.finish_reason]}
        return JSONResponse({**responses.envelope("chat.completion", rid, gen.model_name, [choice]),
                             "usage": responses.usage(end)})

    return app
