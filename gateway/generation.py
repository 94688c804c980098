"""What the gRPC and HTTP front ends share: validate, tokenize, submit to a scheduler replica, and turn
token ids into text deltas with stop strings, logprobs, cancellation and an admission bound."""

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apex_serve import convert, tracing
from apex_serve.errors import InvalidArgument, ResourceExhausted
from apex_serve.types import FinishReason, SamplingParams, TokenLogprob, WorkerInfo
from gateway import validation
from gateway.chat_template import ChatOptions, ChatTemplate
from gateway.config import GatewayConfig
from gateway.replicas import Replicas, RoutedCall
from gateway.request_span import RequestSpan
from gateway.stop_strings import StopStringMatcher
from gateway.structured import GrammarChecker
from gateway.tokenizer import IncrementalDetokenizer, Tokenizer, bad_words_token_ids, load_tokenizer, token_bytes


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | Sequence[int]  # text, or token ids; ignored when messages are given
    sampling: SamplingParams
    messages: tuple[Mapping[str, Any], ...] = ()  # a conversation, rendered with the chat template
    chat_options: ChatOptions = field(default_factory=ChatOptions)  # how the conversation is rendered
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    model: str = ""
    request_id: str = ""
    fill_context: bool = False  # max_tokens: all the room the prompt leaves (OpenAI without max_tokens)
    grammar_field: str = "sampling.structured_grammar"  # the API field sampling.structured_grammar was built from


def samples_of(request: GenerationRequest, count: int, request_id: str, first: int = 0) -> list[GenerationRequest]:
    """count samples of a request, request ids request_id-k from k = first (the request itself when it is the only
    one). Each is an engine request of its own that prefills the prompt again: the engine shares no prefix between
    requests. With a seed, sample j samples with seed + j, so that samples differ yet reproduce (as vLLM seeds its n
    samples)."""
    if count == 1 and first == 0:
        return [request]
    sampling = request.sampling
    return [
        replace(
            request, request_id=f"{request_id}-{first + j}",
            sampling=sampling if sampling.seed is None else replace(sampling, seed=(sampling.seed + j) % 2**63),
        )
        for j in range(count)
    ]


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed validation."""

    request_id: str
    prompt_token_ids: list[int]
    request: GenerationRequest
    sampling: SamplingParams


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # aligned with token_ids when asked for
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, these token_ids included
    # on a request's first event only: the prompt's token ids, and with sampling.prompt_logprobs those of the
    # prompt tokens after the first as the engine gives them
    prompt_token_ids: tuple[int, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationEnd:
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_reason: str | None = None  # the stop string that matched
    prompt_token_ids: tuple[int, ...] = ()  # when this is the request's first event (it generated no token)


class Generator:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        model_name: str,
        worker: WorkerInfo,
        replicas: Replicas,
        max_concurrent_requests: int,
        max_prompt_bytes: int,
        limits: validation.RequestLimits | None = None,
    ) -> None:
        """limits: the request bounds besides max_prompt_bytes (which wins over limits.max_prompt_bytes)."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model_name = model_name
        self.worker = worker
        self.replicas = replicas
        self._max_concurrent = max_concurrent_requests
        self._limits = replace(limits or validation.RequestLimits(), max_prompt_bytes=max_prompt_bytes)
        self._active: set[str] = set()
        self.grammars = GrammarChecker(tokenizer, worker.vocab_size, worker.eos_token_ids)
        self._tracer = tracing.tracer(__name__)  # None: tracing off, no span

    @classmethod
    def for_config(
        cls, config: GatewayConfig, worker: WorkerInfo, replicas: Replicas, model_name: str | None = None
    ) -> "Generator":
        """The Generator a gateway with this config serves: its model directory's tokenizer and chat template, its
        bounds, and the served model name (or model_name)."""
        return cls(
            load_tokenizer(config.model_dir), ChatTemplate.from_model_dir(config.model_dir),
            model_name or config.served_model_name, worker, replicas, config.max_concurrent_requests,
            config.max_prompt_bytes, config.request_limits,
        )

    @property
    def num_active(self) -> int:
        return len(self._active)

    def _prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate and tokenize; raises NotFound, InvalidArgument or ResourceExhausted. The bounds on what a
        request carries are checked first, before any tokenizing or template rendering."""
        limits = self._limits
        validation.check_model(request.model, self.model_name)
        validation.check_stop_strings(request.stop, limits)
        validation.check_bad_words(request.sampling.bad_words, limits)
        if request.messages:
            if self.chat_template is None:
                raise InvalidArgument("messages", f"model '{self.model_name}' has no chat template; send a prompt")
            validation.check_messages(request.messages, limits)
            text = self.chat_template.render(request.messages, request.chat_options)
            validation.check_text_size("messages", text, limits.max_prompt_bytes)  # with the template's text
            prompt_ids = self.tokenizer.encode(text, add_special_tokens=False).ids  # the template has them
        elif isinstance(request.prompt, str):
            validation.check_prompt_text(request.prompt)
            validation.check_text_size("prompt", request.prompt, limits.max_prompt_bytes)
            prompt_ids = self.tokenizer.encode(request.prompt).ids
        else:
            prompt_ids = list(request.prompt)
            validation.check_prompt_ids(prompt_ids, self.worker.vocab_size)
        sampling = request.sampling
        if sampling.truncate_prompt_tokens is not None:
            prompt_ids = prompt_ids[-sampling.truncate_prompt_tokens :]
        if sampling.bad_words:
            words = bad_words_token_ids(self.tokenizer, sampling.bad_words)
            sampling = replace(sampling, bad_words_token_ids=sampling.bad_words_token_ids + words)
        if request.fill_context:  # at least 1, so that a prompt past the context is named as such below
            sampling = replace(sampling, max_tokens=max(self._room(len(prompt_ids)), 1))
        validation.check_lengths(len(prompt_ids), sampling, self.worker.max_model_len)
        validation.check_sampling_token_ids(sampling, self.worker.vocab_size)
        if len(self._active) >= self._max_concurrent:
            raise ResourceExhausted(
                f"{len(self._active)} requests in flight (max_concurrent_requests {self._max_concurrent})"
            )
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._active:
            raise InvalidArgument("request_id", f"{request_id!r} is already in flight")
        return PreparedRequest(request_id, prompt_ids, request, sampling)

    def _room(self, num_prompt_tokens: int) -> int:
        """Output tokens a prompt leaves: within the context, and within the larger of the scheduler's KV pools, which
        holds every token but the last generated one."""
        w = self.worker
        pool_tokens = max(w.num_kv_blocks, w.num_cpu_kv_blocks) * w.block_size
        return min(w.max_model_len, pool_tokens + 1) - num_prompt_tokens

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationEnd]:
        """Text deltas, then one GenerationEnd. Bad input raises at the first step, before any
        output; closing the iterator early aborts the request in the scheduler."""
        # before _prepare, whose admission checks hold only while nothing is awaited until the request is active
        await self.grammars.check(request.grammar_field, request.sampling.structured_grammar)
        prepared = self._prepare(request)
        span = None if self._tracer is None else RequestSpan(
            self._tracer, prepared.request_id, bool(request.messages), self.model_name, prepared.sampling,
            request.stop, len(prepared.prompt_token_ids),
        )
        try:
            call = self.replicas.submit(
                convert.submit_request_to_pb(prepared.request_id, prepared.prompt_token_ids, prepared.sampling),
                None if span is None else span.context,
            )
        except BaseException as exc:
            if span is not None:
                span.failed(exc)
                span.close()
            raise
        self._active.add(prepared.request_id)
        try:
            async for event in self._events(prepared, call):
                if span is not None and isinstance(event, GenerationEnd):
                    span.ended(event.completion_tokens, event.finish_reason)
                yield event
        except Exception as exc:
            if span is not None:
                span.failed(exc)
            raise
        finally:
            call.cancel()  # no-op when done; otherwise (stop string, client gone) the scheduler aborts
            self._active.discard(prepared.request_id)
            if span is not None:
                span.close()

    async def _events(
        self, prepared: PreparedRequest, call: RoutedCall
    ) -> AsyncIterator[TextDelta | GenerationEnd]:
        request = prepared.request
        num_prompt = len(prepared.prompt_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, prepared.sampling.skip_special_tokens)
        stops = StopStringMatcher(request.stop, request.include_stop_str_in_output)
        completion_tokens = 0
        prompt_ids: tuple[int, ...] = tuple(prepared.prompt_token_ids)  # () once the first event carried them
        async for msg in call:
            out = convert.request_output_from_pb(prepared.request_id, msg)
            completion_tokens = max(completion_tokens, out.num_output_tokens)
            result = stops.feed(detok.push(out.new_token_ids) + (detok.flush() if out.finished else ""))
            text = result.text + (stops.flush() if out.finished and result.stop is None else "")
            if text or out.new_token_ids or out.prompt_logprobs:
                yield TextDelta(
                    text, out.new_token_ids, out.logprobs, num_prompt, completion_tokens, prompt_ids, out.prompt_logprobs
                )
                prompt_ids = ()
            if result.stop is not None:
                yield GenerationEnd(
                    prepared.request_id, FinishReason.STOP, num_prompt, completion_tokens, result.stop, prompt_ids
                )
                return
            if out.finished:
                reason = out.finish_reason or FinishReason.ABORT
                yield GenerationEnd(prepared.request_id, reason, num_prompt, completion_tokens, None, prompt_ids)
                return

    async def abort(self, request_id: str) -> bool:
        return await self.replicas.abort(request_id)

    async def ready(self) -> bool:
        """True while at least one scheduler replica is SERVING and its engine is not stalled."""
        return self.replicas.ready

    @property
    def limits(self) -> validation.RequestLimits:
        return self._limits

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, which for a part of a multi-byte character are not the UTF-8 of its text."""
        return token_bytes(self.tokenizer, token_id)
