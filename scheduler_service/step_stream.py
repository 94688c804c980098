"""The scheduler's Steps stream to the gpu_worker: plans written in the order they are sent, each reply taken by the
plan sent first among those still waiting (the worker answers in order)."""

import asyncio
from collections import deque
from collections.abc import AsyncIterator

import grpc

from apex_serve import rpc
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc


class StepStream:
    """One Steps call. A step's failure comes in its reply; the stream itself ends only when the worker, the channel
    or the connection does, so every plan still waiting then fails UNAVAILABLE with what ended it (the worker's state
    is unknown: the caller treats it as a worker gone). `ended` then, and a new stream is needed."""

    def __init__(self, stub: gpu_worker_pb2_grpc.GpuWorkerStub) -> None:
        self._outbox: asyncio.Queue[gpu_worker_pb2.StepRequest] = asyncio.Queue()
        self._waiting: deque[asyncio.Future[gpu_worker_pb2.StepResponse]] = deque()
        self._call = stub.Steps(self._requests())
        self._reader = asyncio.create_task(self._read(), name="steps")

    @property
    def ended(self) -> bool:
        return self._reader.done()

    def send(self, request: gpu_worker_pb2.StepRequest) -> "asyncio.Future[gpu_worker_pb2.StepResponse]":
        """The plan's reply, once the worker answers: its output, or its error fields set."""
        reply: asyncio.Future[gpu_worker_pb2.StepResponse] = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        self._outbox.put_nowait(request)
        return reply

    async def _requests(self) -> AsyncIterator[gpu_worker_pb2.StepRequest]:
        while True:
            yield await self._outbox.get()

    async def _read(self) -> None:
        why = "the gpu_worker ended it"
        try:
            async for reply in self._call:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            why = "its channel closed"
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled itself, not by its channel
                raise
        finally:
            ended = rpc.rpc_error(grpc.StatusCode.UNAVAILABLE, f"the Steps stream ended ({why})")
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_exception(ended)
