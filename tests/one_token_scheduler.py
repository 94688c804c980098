"""A stand-in for the gateway's scheduler stub, for gateways run in process: every Submit is recorded and answers
one token ("A", id 65) that finishes the request (length); GetMetrics is UNAVAILABLE (no engine to report)."""

from collections.abc import AsyncIterator

import grpc

from apex_serve.v1 import common_pb2, scheduler_pb2


class OneTokenScheduler:
    def __init__(self) -> None:
        self.requests: list[scheduler_pb2.SubmitRequest] = []

    @property
    def submitted(self) -> int:
        return len(self.requests)

    def Submit(self, request: scheduler_pb2.SubmitRequest) -> "OneTokenCall":
        self.requests.append(request)
        return OneTokenCall(len(request.prompt_token_ids))

    async def GetMetrics(self, request: object, timeout: float | None = None) -> None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "stand-in")


class OneTokenCall:
    def __init__(self, num_prompt: int) -> None:
        self._num_prompt = num_prompt

    async def __aiter__(self) -> AsyncIterator[scheduler_pb2.SubmitResponse]:
        usage = common_pb2.Usage(prompt_tokens=self._num_prompt, completion_tokens=1,
                                 total_tokens=self._num_prompt + 1)
        yield scheduler_pb2.SubmitResponse(
            token_ids=[65], finished=True, finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage
        )

    def cancel(self) -> bool:
        return True
