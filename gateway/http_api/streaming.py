"""Running a generation for an HTTP client: its first event before any response (so bad input is an
HTTP error), abort when the client goes away, and server-sent events framing."""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse

from apex_serve.errors import Unavailable
from gateway.drain import Drain
from gateway.generation import GenerationEnd, GenerationRequest, Generator, TextDelta
from gateway.http_api import errors
from gateway.http_api.responses import Usage

logger = logging.getLogger(__name__)

T = TypeVar("T")
Event = TextDelta | GenerationEnd
DONE = "data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so only http.disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """The awaitable's result; if the client disconnects first, it is cancelled and ClientDisconnect raised."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))
    if work.cancelled():
        raise ClientDisconnect()
    return work.result()


class Generation:
    """One request's events, the first one already received, until the server's drain cuts them (Unavailable).
    Iterate it once, or close it."""

    def __init__(self, first: Event, events: AsyncIterator[Event]) -> None:
        self._first: Event | None = first
        self._events = events
        self._prompt_tokens = first.prompt_tokens
        self._completion_tokens = 0  # as of the last event iterated

    @classmethod
    async def open(cls, drain: Drain, generator: Generator, generation: GenerationRequest) -> "Generation":
        """Waits for the request's first event; raises the Generator's errors (bad input, admission), and
        Unavailable when the drain ends first. Cancelling it aborts the request."""
        events = drain.until_cut(generator.stream(generation))
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return cls(first, events)

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._first is not None:
            first, self._first = self._first, None
            self._completion_tokens = first.completion_tokens
            yield first
        async for event in self._events:
            self._completion_tokens = event.completion_tokens
            yield event

    def usage(self) -> Usage:
        """The prompt's tokens and those generated as of the last event iterated."""
        return Usage.counts(self._prompt_tokens, self._completion_tokens)

    async def aclose(self) -> None:
        """Aborts the request in the scheduler unless it already ended (no-op then)."""
        await self._events.aclose()


@dataclass(frozen=True)
class Collected:
    text: str
    deltas: tuple[TextDelta, ...]
    end: GenerationEnd


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class Closable(Protocol):
    async def aclose(self) -> None: ...


def sse_response(chunks: AsyncIterator[str], generation: Closable) -> StreamingResponse:
    """Streams chunks then [DONE]. An error after the headers went out (the drain's cut too) becomes an error event;
    a client that disconnects cancels the stream, and closing the generation aborts the request."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # the status line is sent: the error goes in the stream, as vLLM does
            status, error = errors.describe(exc)
            if isinstance(exc, Unavailable):  # the drain's cut: expected, and the drain logs it once
                logger.info("stream cut: %s", exc)
            elif status >= 500:
                logger.exception("stream failed after its first event")
            yield sse(error)
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(generation.aclose))
