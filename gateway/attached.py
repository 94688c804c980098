"""This gateway's requests to one scheduler replica over a single Attach stream: a submit or an abort is one message
up, and each engine step's outputs come down as one OutputBatch, split here into the per-request calls. A call
reads like a Submit stream (SubmitResponse messages, grpc.aio.AioRpcError on failure), so the routing above it does
not know the difference. The stream is opened on the first submit and again after it ends; when it breaks, every
request on it fails with the stream's status (UNAVAILABLE for a scheduler that went away)."""

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from opentelemetry import propagate

from apex_serve import rpc, tracing
from apex_serve.v1 import gpu_worker_pb2, scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

_Item = scheduler_pb2.RequestUpdate | grpc.aio.AioRpcError


class _Stream:
    """One Attach call and the requests on it."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self._outbox: asyncio.Queue[scheduler_pb2.AttachRequest] = asyncio.Queue()
        self.calls: dict[str, asyncio.Queue[_Item]] = {}
        self._call = stub.Attach(self._requests())
        self.reader = asyncio.create_task(self._read(), name="attach")

    async def _requests(self) -> AsyncIterator[scheduler_pb2.AttachRequest]:
        while True:
            yield await self._outbox.get()

    def send(self, message: scheduler_pb2.AttachRequest) -> None:
        self._outbox.put_nowait(message)

    async def _read(self) -> None:
        ended = rpc.rpc_error(grpc.StatusCode.UNAVAILABLE, "the scheduler ended the Attach stream")
        try:
            async for batch in self._call:
                for update in batch.updates:
                    queue = self.calls.get(update.request_id)
                    if queue is None:
                        continue
                    queue.put_nowait(update)
                    if update.error_code or update.output.finished:
                        del self.calls[update.request_id]
        except grpc.aio.AioRpcError as exc:
            ended = exc
            logger.warning("the Attach stream to a scheduler ended: %s %s", exc.code().name, exc.details())
        finally:
            calls, self.calls = self.calls, {}
            for queue in calls.values():
                queue.put_nowait(ended)

    def close(self) -> None:
        self._call.cancel()


class AttachedCall:
    """One request on an Attach stream, iterated like a Submit call."""

    def __init__(self, stream: _Stream, request_id: str, queue: asyncio.Queue[_Item]) -> None:
        self._stream = stream
        self._request_id = request_id
        self._queue = queue
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        while not self._ended:
            item = await self._queue.get()
            if isinstance(item, grpc.aio.AioRpcError):
                self._ended = True
                raise item
            if item.error_code:
                self._ended = True
                raise rpc.rpc_error(item.error_code, item.error_message, item.error_kind)
            self._ended = item.output.finished
            yield item.output

    def cancel(self) -> None:
        """Aborts the request on the scheduler unless it has ended (a no-op then)."""
        if self._stream.calls.get(self._request_id) is self._queue:
            del self._stream.calls[self._request_id]
            self._stream.send(scheduler_pb2.AttachRequest(abort_request_id=self._request_id))
        self._ended = True


class AttachedScheduler:
    """A scheduler stub whose Submit goes over this gateway's Attach stream to it; the other RPCs are the stub's."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        self._stub = stub
        self._stream: _Stream | None = None
        self._traced = tracing.tracer(__name__) is not None

    def Submit(self, request: scheduler_pb2.SubmitRequest) -> AttachedCall:
        """Sends the request on the stream, in the current trace context."""
        if self._stream is None or self._stream.reader.done():
            self._stream = _Stream(self._stub)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        if request.request_id in self._stream.calls:
            queue.put_nowait(rpc.rpc_error(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"request_id: {request.request_id!r} is already running"))
            return AttachedCall(self._stream, request.request_id, queue)
        self._stream.calls[request.request_id] = queue
        carrier: dict[str, str] = {}
        if self._traced:
            propagate.inject(carrier)
        self._stream.send(scheduler_pb2.AttachRequest(submit=request, trace_context=carrier))
        return AttachedCall(self._stream, request.request_id, queue)

    def Abort(self, request: scheduler_pb2.AbortRequest) -> grpc.aio.UnaryUnaryCall:
        return self._stub.Abort(request)

    def GetStats(self, request: scheduler_pb2.GetStatsRequest, timeout: float | None = None
                 ) -> grpc.aio.UnaryUnaryCall:
        return self._stub.GetStats(request, timeout=timeout)

    def GetMetrics(self, request: scheduler_pb2.GetMetricsRequest, timeout: float | None = None
                   ) -> grpc.aio.UnaryUnaryCall:
        return self._stub.GetMetrics(request, timeout=timeout)

    def GetWorkerInfo(self, request: gpu_worker_pb2.GetWorkerInfoRequest) -> grpc.aio.UnaryUnaryCall:
        return self._stub.GetWorkerInfo(request)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
