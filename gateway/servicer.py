"""gRPC edge of the gateway: protobuf in and out, everything else in gateway.generation."""

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import grpc

from apex_serve import __version__, convert
from apex_serve.errors import InvalidArgument, NotFound
from apex_serve.types import TokenLogprob
from apex_serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from gateway import structured, validation
from gateway.chat_template import ChatOptions
from gateway.drain import Drain
from gateway.generation import GenerationEnd, GenerationRequest, Generator, TextDelta, samples_of
from gateway.merge import merge

CAPABILITIES = (
    "generate.stream", "abort", "stop_strings", "stop_token_ids", "logprobs", "penalties", "min_tokens", "seed",
    "min_p", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "skip_special_tokens", "chat_options",
    "openai.completions", "openai.chat_completions", "openai.tokenize", "api_keys", "tls", "n", "prompt_logprobs",
    "openai.echo", "openai.batched_prompts", "openai.best_of", "structured_outputs", "openai.tools",
)
_GRAMMAR_FIELD = "sampling.structured_grammar"


def _chat_options(msg: gateway_pb2.ChatOptions) -> ChatOptions:
    return ChatOptions(
        add_generation_prompt=msg.add_generation_prompt if msg.HasField("add_generation_prompt") else True,
        continue_final_message=msg.continue_final_message,
        template_kwargs=convert.json_object_from_pb(msg.chat_template_kwargs, "chat.chat_template_kwargs"),
    )


def _structured(request: gateway_pb2.GenerateRequest, sampling: common_pb2.SamplingParams) -> tuple[str, str]:
    """The grammar the request constrains its output with, and the field a compile error names."""
    if not request.HasField("structured_outputs"):
        return sampling.structured_grammar, _GRAMMAR_FIELD
    spec = request.structured_outputs
    kind = spec.WhichOneof("constraint")
    field = f"structured_outputs.{kind}" if kind else "structured_outputs"
    if sampling.structured_grammar:
        raise InvalidArgument(field, f"cannot be combined with {_GRAMMAR_FIELD}: send one of them")
    if kind == "json_schema":
        return structured.json_schema_grammar(field, spec.json_schema), field
    if kind == "json_object" and spec.json_object:
        return structured.ANY_JSON_OBJECT, field
    if kind == "regex":
        return structured.regex_grammar(field, spec.regex), field
    if kind == "choice":
        return structured.choice_grammar(field, list(spec.choice.choices)), field
    if kind == "grammar":
        return structured.cfg_grammar(field, spec.grammar), field
    raise InvalidArgument(field, "needs one of json_schema, json_object: true, regex, choice, grammar")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, generator: Generator) -> None:
        self._gen = generator
        self.drain = Drain()  # the gateway's stop cuts the Generate streams past its drain: UNAVAILABLE
        self._groups: dict[str, tuple[str, ...]] = {}  # a call's request id -> its samples' (n > 1)

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        validation.check_samples("n", request.n or 1, self._gen.limits)
        grammar, grammar_field = _structured(request, request.sampling)
        generation = GenerationRequest(
            prompt=request.prompt,
            messages=convert.chat_messages_from_pb(request.messages),
            chat_options=_chat_options(request.chat),
            sampling=replace(convert.sampling_from_pb(request.sampling), structured_grammar=grammar),
            grammar_field=grammar_field,
            stop=tuple(request.stop),
            include_stop_str_in_output=request.include_stop_str_in_output,
            model=request.model,
            request_id=request.request_id,
        )
        samples = samples_of(generation, request.n or 1, request.request_id or uuid.uuid4().hex)
        if len(samples) > 1:
            self._groups[request.request_id] = tuple(s.request_id for s in samples)
        streams = [self.drain.until_cut(self._gen.stream(s)) for s in samples]
        try:
            async with aclosing(merge(streams)) as events:
                async for index, event in events:
                    yield self._response(index, event)
        finally:
            self._groups.pop(request.request_id, None)
            for stream in streams:
                await stream.aclose()

    def _response(self, index: int, event: TextDelta | GenerationEnd) -> gateway_pb2.GenerateResponse:
        if isinstance(event, GenerationEnd):
            return gateway_pb2.GenerateResponse(
                complete=gateway_pb2.GenerateComplete(
                    finish_reason=convert.finish_reason_to_pb(event.finish_reason),
                    usage=convert.usage_to_pb(event.prompt_tokens, event.completion_tokens),
                    request_id=event.request_id,
                    stop_reason=event.stop_reason or "",
                    index=index,
                )
            )
        return gateway_pb2.GenerateResponse(
            chunk=gateway_pb2.GenerateChunk(
                text=event.text, token_ids=event.token_ids, logprobs=[self._logprob(lp) for lp in event.logprobs],
                index=index, prompt_logprobs=[self._logprob(lp) for lp in event.prompt_logprobs],
            )
        )

    def _logprob(self, lp: TokenLogprob) -> common_pb2.TokenLogprob:
        msg = convert.logprob_to_pb(lp)
        msg.token = self._gen.token_text(lp.token_id)
        for top in msg.top:
            top.token = self._gen.token_text(top.token_id)
        return msg

    async def Abort(
        self, request: gateway_pb2.AbortGenerateRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AbortGenerateResponse:
        ids = self._groups.get(request.request_id, (request.request_id,))
        aborted = [await self._gen.abort(request_id) for request_id in ids]
        return gateway_pb2.AbortGenerateResponse(aborted=any(aborted))

    async def GetModelInfo(
        self, request: gateway_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ModelInfo:
        w = self._gen.worker
        return gateway_pb2.ModelInfo(
            name=self._gen.model_name, max_model_len=w.max_model_len, vocab_size=w.vocab_size, dtype=w.dtype,
            device=w.device,
        )

    async def GetServerInfo(
        self, request: gateway_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ServerInfo:
        return gateway_pb2.ServerInfo(name="apex-serve", version=__version__, capabilities=CAPABILITIES)

    async def ServerLive(
        self, request: gateway_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ServerLiveResponse:
        return gateway_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: gateway_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ServerReadyResponse:
        return gateway_pb2.ServerReadyResponse(ready=await self._gen.ready())

    async def ModelReady(
        self, request: gateway_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ModelReadyResponse:
        if request.name and request.name != self._gen.model_name:
            raise NotFound(f"model '{request.name}' is not served here; this server serves '{self._gen.model_name}'")
        return gateway_pb2.ModelReadyResponse(ready=await self._gen.ready())
