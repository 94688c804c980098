"""Attach for stand-in schedulers that answer Submit: each request on the stream is played through the stand-in's
Submit handler, each of its messages (or its error) sent as a batch of one; an abort cancels the request's handler,
as a client that cancels a Submit call does."""

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from apex_serve import errors, rpc
from apex_serve.v1 import scheduler_pb2

SubmitHandler = Callable[[scheduler_pb2.SubmitRequest, grpc.aio.ServicerContext],
                         AsyncIterator[scheduler_pb2.SubmitResponse]]


async def attach_over_submit(
    submit: SubmitHandler, messages: AsyncIterator[scheduler_pb2.AttachRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[scheduler_pb2.OutputBatch]:
    updates: asyncio.Queue[scheduler_pb2.RequestUpdate] = asyncio.Queue()
    handlers: dict[str, asyncio.Task[None]] = {}

    async def play(request: scheduler_pb2.SubmitRequest) -> None:
        request_id = request.request_id
        try:
            async for msg in submit(request, context):
                updates.put_nowait(scheduler_pb2.RequestUpdate(request_id=request_id, output=msg))
        except errors.ApexError as exc:
            code, details, kind = rpc.error_status(exc)
            updates.put_nowait(scheduler_pb2.RequestUpdate(
                request_id=request_id, error_code=code.value[0], error_message=details, error_kind=kind))

    async def read() -> None:
        async for message in messages:
            if message.HasField("submit"):
                request_id = message.submit.request_id
                handlers[request_id] = asyncio.create_task(play(message.submit))
            elif (handler := handlers.pop(message.abort_request_id, None)) is not None:
                handler.cancel()

    reader = asyncio.create_task(read())
    try:
        while True:
            yield scheduler_pb2.OutputBatch(updates=[await updates.get()])
    finally:
        for task in (reader, *handlers.values()):
            task.cancel()
