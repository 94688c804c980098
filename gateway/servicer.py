"""gRPC edge of the gateway: Generate streams text chunks, then one `complete`."""

import uuid
from collections.abc import AsyncIterator

import grpc

from apex_serve import convert
from apex_serve.types import WorkerInfo
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from gateway import validation
from gateway.tokenizer import IncrementalDetokenizer, Tokenizer


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        worker: WorkerInfo,
        scheduler: scheduler_pb2_grpc.SchedulerStub,
    ) -> None:
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._worker = worker
        self._scheduler = scheduler

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        validation.check_model(request.model, self._model_name)
        validation.check_prompt_text(request.prompt)
        sampling = convert.sampling_from_pb(request.sampling)
        prompt_ids = self._tokenizer.encode(request.prompt).ids
        validation.check_lengths(len(prompt_ids), sampling, self._worker.max_model_len)
        request_id = request.request_id or uuid.uuid4().hex
        call = self._scheduler.Submit(
            scheduler_pb2.SubmitRequest(
                request_id=request_id, prompt_token_ids=prompt_ids, sampling=convert.sampling_to_pb(sampling)
            )
        )
        detok = IncrementalDetokenizer(self._tokenizer)
        try:
            async for out in call:
                text = detok.push(out.token_ids)
                if out.finished:
                    text += detok.flush()
                if text or out.token_ids:
                    yield gateway_pb2.GenerateResponse(
                        chunk=gateway_pb2.GenerateChunk(text=text, token_ids=out.token_ids)
                    )
                if out.finished:
                    yield gateway_pb2.GenerateResponse(
                        complete=gateway_pb2.GenerateComplete(
                            finish_reason=out.finish_reason, usage=out.usage, request_id=request_id
                        )
                    )
        finally:
            call.cancel()  # no-op when done; on a client cancel it aborts the request downstream

    async def GetModelInfo(
        self, request: gateway_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ModelInfo:
        w = self._worker
        return gateway_pb2.ModelInfo(
            name=self._model_name, max_model_len=w.max_model_len, vocab_size=w.vocab_size, dtype=w.dtype, device=w.device
        )
