"""The engine requests of one HTTP request (a batch of prompts, n or best_of samples each): started together so
that bad input is an HTTP error before any output, collected or streamed together, and all aborted when the client
goes away or one of them fails."""

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from starlette.requests import Request

from apex_serve.errors import InvalidArgument
from gateway.generation import GenerationEnd, GenerationRequest, Generator
from gateway.http_api.responses import Usage
from gateway.http_api.streaming import Collected, Event, Generation, until_disconnect
from gateway.merge import merge


class Samples:
    """Generations in choice order; iterate them once (merged or collected), or close them."""

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations

    @classmethod
    async def start(
        cls, request: Request, generator: Generator, wanted: Sequence[GenerationRequest],
        prompt_indexes: Sequence[int] | None = None,
    ) -> "Samples":
        """Raises the first error in choice order, ClientDisconnect, or Unavailable; whatever started is then aborted.
        prompt_indexes (a batch of prompts): the prompt of each wanted request, so that an error naming `prompt`
        names `prompt[i]`."""
        drain = request.app.state.drain
        tasks = [asyncio.ensure_future(Generation.open(drain, generator, w)) for w in wanted]
        try:
            await until_disconnect(request, asyncio.gather(*tasks, return_exceptions=True))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await _close_started(tasks)
            raise
        failed = next((i for i, t in enumerate(tasks) if t.exception() is not None), None)
        if failed is None:
            return cls([t.result() for t in tasks])
        await _close_started(tasks)
        error = tasks[failed].exception()
        if prompt_indexes is not None and isinstance(error, InvalidArgument) and error.field == "prompt":
            index = prompt_indexes[failed]
            raise InvalidArgument(f"prompt[{index}]", str(error).removeprefix("prompt: ")) from error
        raise error  # type: ignore[misc]

    def usage(self, per_prompt: int = 1) -> Usage:
        """Each prompt's tokens once (per_prompt: the samples of a prompt, in a row) and the tokens generated, as of
        the last events iterated."""
        usages = [g.usage() for g in self.generations]
        prompt_tokens = sum(u.prompt_tokens for u in usages[::per_prompt])
        return Usage.counts(prompt_tokens, sum(u.completion_tokens for u in usages))

    async def collect(self, request: Request) -> list[Collected]:
        """Every generation whole; a client that disconnects meanwhile aborts them all (ClientDisconnect)."""

        async def run(generation: Generation) -> Collected:
            deltas = []
            async for event in generation:
                if isinstance(event, GenerationEnd):
                    return Collected("".join(d.text for d in deltas), tuple(deltas), event)
                deltas.append(event)
            raise RuntimeError("the generation ended without a GenerationEnd")

        tasks = [asyncio.ensure_future(run(g)) for g in self.generations]
        try:
            return await until_disconnect(request, asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            await self.aclose()

    async def merged(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they arrive; the first failure ends the stream (and aborts the others)."""
        try:
            async with aclosing(merge(self.generations)) as events:
                async for index, event in events:
                    yield index, event
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Aborts every request that has not ended."""
        await asyncio.gather(*(g.aclose() for g in self.generations), return_exceptions=True)


async def _close_started(tasks: Sequence["asyncio.Future[Generation]"]) -> None:
    started = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
    await asyncio.gather(*(g.aclose() for g in started), return_exceptions=True)
