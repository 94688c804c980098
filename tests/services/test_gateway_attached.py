"""The gateway's end of Attach (gateway/attached.py) against a stand-in scheduler over real gRPC: a request's error
arrives as the status and error kind Submit would have ended with, a cancelled request is aborted on the stream, a
request id already running is refused without reaching the scheduler, and a stream the scheduler ends fails the
requests still on it UNAVAILABLE while the next request opens a new one."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from apex_serve import rpc
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from gateway.attached import AttachedCall, AttachedScheduler


class StandIn(scheduler_pb2_grpc.SchedulerServicer):
    """Answers each submit by its request id: "fail-*" with a CPU-pool-lost error, "hang-*" never, others with one
    finished token; "end" ends the stream. Records every message it was sent, and counts the streams opened."""

    def __init__(self) -> None:
        self.received: list[scheduler_pb2.AttachRequest] = []
        self.streams = 0

    async def Attach(self, request_iterator: AsyncIterator[scheduler_pb2.AttachRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.OutputBatch]:
        self.streams += 1
        async for message in request_iterator:
            self.received.append(message)
            request_id = message.submit.request_id
            if not message.HasField("submit") or request_id.startswith("hang-"):
                continue
            if request_id == "end":
                return
            if request_id.startswith("fail-"):
                update = scheduler_pb2.RequestUpdate(
                    request_id=request_id, error_code=grpc.StatusCode.UNAVAILABLE.value[0],
                    error_message="the CPU pool is lost", error_kind="cpu-pool-lost")
            else:
                update = scheduler_pb2.RequestUpdate(
                    request_id=request_id, output=scheduler_pb2.SubmitResponse(token_ids=[65], finished=True))
            yield scheduler_pb2.OutputBatch(updates=[update])


@pytest.fixture
async def attached() -> AsyncIterator[tuple[AttachedScheduler, StandIn]]:
    stand_in = StandIn()
    server = rpc.create_server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    scheduler = AttachedScheduler(scheduler_pb2_grpc.SchedulerStub(channel))
    try:
        yield scheduler, stand_in
    finally:
        scheduler.close()
        await channel.close()
        await server.stop(None)


def _submit(scheduler: AttachedScheduler, request_id: str) -> AttachedCall:
    return scheduler.Submit(scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=[1, 2]))


async def _messages(call: AttachedCall) -> list[scheduler_pb2.SubmitResponse]:
    return [msg async for msg in call]


async def test_a_failed_request_raises_the_status_and_kind_submit_would_have_and_others_finish(
        attached: tuple[AttachedScheduler, StandIn]) -> None:
    scheduler, _ = attached
    ok, failed = _submit(scheduler, "ok"), _submit(scheduler, "fail-1")
    assert [list(m.token_ids) for m in await asyncio.wait_for(_messages(ok), 10)] == [[65]]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(_messages(failed), 10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and error.value.details() == "the CPU pool is lost"
    assert rpc.error_kind(error.value) == "cpu-pool-lost"


async def test_a_cancelled_request_is_aborted_on_the_stream_and_a_running_id_is_refused_locally(
        attached: tuple[AttachedScheduler, StandIn]) -> None:
    scheduler, stand_in = attached
    hanging = _submit(scheduler, "hang-1")
    duplicate = _submit(scheduler, "hang-1")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await asyncio.wait_for(_messages(duplicate), 10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in error.value.details()
    hanging.cancel()
    hanging.cancel()  # once is enough: the second is a no-op
    deadline = asyncio.get_running_loop().time() + 10
    while sum(m.abort_request_id == "hang-1" for m in stand_in.received) < 1:
        assert asyncio.get_running_loop().time() < deadline, stand_in.received
        await asyncio.sleep(0.01)
    assert [m.submit.request_id for m in stand_in.received if m.HasField("submit")] == ["hang-1"]
    assert [m.abort_request_id for m in stand_in.received if not m.HasField("submit")] == ["hang-1"]


async def test_a_stream_the_scheduler_ends_fails_its_requests_unavailable_and_the_next_opens_another(
        attached: tuple[AttachedScheduler, StandIn]) -> None:
    scheduler, stand_in = attached
    stranded = _submit(scheduler, "hang-2")
    ender = _submit(scheduler, "end")
    for call in (stranded, ender):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await asyncio.wait_for(_messages(call), 10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [list(m.token_ids) for m in await asyncio.wait_for(_messages(_submit(scheduler, "after")), 10)] == [[65]]
    assert stand_in.streams == 2
