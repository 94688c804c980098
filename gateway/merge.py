"""Several event streams as one: (stream index, event) in arrival order."""

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


async def merge(streams: Sequence[AsyncIterable[T]]) -> AsyncIterator[tuple[int, T]]:
    """Each stream is read by a task of its own; the first one to fail ends the merge with its error. Closing the
    merge early cancels the readers (the streams themselves are the caller's to close). A single stream is read in
    place, without a task or a queue per event."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, T | asyncio.Task[None]]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterable[T]) -> None:
        async for event in stream:
            queue.put_nowait((index, event))

    pumps = []
    for i, stream in enumerate(streams):
        pumps.append(asyncio.create_task(pump(i, stream)))
        pumps[-1].add_done_callback(lambda task, i=i: queue.put_nowait((i, task)))
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if isinstance(item, asyncio.Task):
                item.result()  # a failed stream ends the merge
                running -= 1
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        if pumps:
            await asyncio.wait(pumps)
