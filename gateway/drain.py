"""The end of a front end's drain: streams still running when it ends are cut with Unavailable, which each front
end turns into its own error (an error event then [DONE] on HTTP, UNAVAILABLE on gRPC) before the server stops."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from apex_serve.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
_CUT = "the server is shutting down: the drain ended before this request finished"
CUT_GRACE_S = 1.0  # after the cut, how long the front end's server waits for the cut streams' last messages


class Drain:
    """Counts the streams running through until_cut; cut_after ends them once the drain time is up."""

    def __init__(self) -> None:
        self._cut = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        self._cutters: set[Callable[[], None]] = set()  # one per running stream: interrupts its wait for an item

    async def cut_after(self, drain_timeout_s: float) -> None:
        """Cuts the streams still running drain_timeout_s from now (and any started later); cancel it to spare them."""
        await asyncio.sleep(drain_timeout_s)
        if self._active:
            logger.warning("drain of %.1fs over: cutting %d stream(s) still running", drain_timeout_s, self._active)
        self._cut.set()
        for cut in list(self._cutters):
            cut()

    async def idle(self) -> None:
        """Returns once no stream runs."""
        await self._idle.wait()

    async def until_cut(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items until the drain cuts them (then Unavailable is raised); closing it, or the cut, closes items.
        The cut interrupts a wait for the next item by cancelling the task that waits (and only that wait): nothing
        is allocated per item."""
        waiter: asyncio.Task[object] | None = None  # the task while it waits for the next item
        cut_here = False

        def cut() -> None:
            nonlocal cut_here
            if waiter is not None:
                cut_here = True
                waiter.cancel()

        self._cutters.add(cut)
        self._active += 1
        self._idle.clear()
        try:
            while True:
                if self._cut.is_set():
                    raise Unavailable(_CUT)
                waiter = asyncio.current_task()
                try:
                    value = await anext(items)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not cut_here or waiter is None:
                        raise
                    waiter.uncancel()
                    raise Unavailable(_CUT) from None
                finally:
                    waiter = None
                yield value
        finally:
            self._cutters.discard(cut)
            await items.aclose()
            self._active -= 1
            if not self._active:
                self._idle.set()
