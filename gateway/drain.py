"""The end of a front end's drain: streams still running when it ends are cut with Unavailable, which each front
end turns into its own error (an error event then [DONE] on HTTP, UNAVAILABLE on gRPC) before the server stops."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

from apex_serve.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
CUT_GRACE_S = 1.0  # after the cut, how long the front end's server waits for the cut streams' last messages


class Drain:
    """Counts the streams running through until_cut; cut_after ends them once the drain time is up."""

    def __init__(self) -> None:
        self._cut = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0

    async def cut_after(self, drain_timeout_s: float) -> None:
        """Cuts the streams still running drain_timeout_s from now (and any started later); cancel it to spare them."""
        await asyncio.sleep(drain_timeout_s)
        if self._active:
            logger.warning("drain of %.1fs over: cutting %d stream(s) still running", drain_timeout_s, self._active)
        self._cut.set()

    async def idle(self) -> None:
        """Returns once no stream runs."""
        await self._idle.wait()

    async def until_cut(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items until the drain cuts them (then Unavailable is raised); closing it, or the cut, closes items."""
        cut = asyncio.ensure_future(self._cut.wait())
        item: asyncio.Future[T] | None = None
        self._active += 1
        self._idle.clear()
        try:
            while True:
                item = asyncio.ensure_future(anext(items))
                await asyncio.wait((item, cut), return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    raise Unavailable("the server is shutting down: the drain ended before this request finished")
                try:
                    value = item.result()
                except StopAsyncIteration:
                    return
                yield value
        finally:
            cut.cancel()
            if item is not None and not item.done():
                item.cancel()
                await asyncio.wait((item,))
            await items.aclose()
            self._active -= 1
            if not self._active:
                self._idle.set()
