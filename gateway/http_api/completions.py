"""POST /v1/completions: text completions of one prompt or a batch, n (or the best n of best_of) samples each,
whole or as server-sent events; with echo, the prompt (and its logprobs) before each completion."""

import time
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from apex_serve.types import TokenLogprob
from gateway.generation import GenerationEnd, GenerationRequest, Generator, TextDelta
from gateway.http_api.dependencies import GeneratorDep, MetricsDep, require_api_key
from gateway.http_api.errors import generation_responses
from gateway.http_api.logprobs import TokenNames, completion_logprobs, echoed, generated, prompt_logprobs
from gateway.http_api.metrics import HttpMetrics
from gateway.http_api.responses import (
    FINISH_REASONS,
    Completion,
    CompletionChoice,
    PromptLogprobs,
    Usage,
    response_id,
)
from gateway.http_api.samples import Samples
from gateway.http_api.schemas import CompletionRequest, Fanout
from gateway.http_api.streaming import Collected, sse, sse_response

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/completions", response_model=None, responses=generation_responses(Completion, Completion))
async def create_completion(
    body: CompletionRequest, request: Request, gen: GeneratorDep, metrics: MetricsDep
) -> Completion | StreamingResponse:
    completion_id = response_id("cmpl")
    fanout = body.generation_requests(completion_id, gen.worker.max_model_len, gen.limits)
    samples = await Samples.start(request, gen, fanout.requests, fanout.prompt_indexes)
    shaper = _Shaper(body, fanout, gen)
    if body.stream:
        return sse_response(_chunks(body, fanout, shaper, samples, gen, metrics, completion_id), samples)
    done = await samples.collect(request)
    for d in done:
        metrics.finished(d.end)
    choices = [shaper.choice(k, d) for k, d in enumerate(done)]
    if fanout.samples > fanout.n:
        choices = _best(choices, done, fanout)
    for index, choice in enumerate(choices):
        choice.index = index
    completion_tokens = 0 if fanout.drop_generated else sum(d.end.completion_tokens for d in done)
    usage = Usage.counts(sum(d.end.prompt_tokens for d in done[:: fanout.samples]), completion_tokens)
    return Completion(id=completion_id, model=gen.model_name, choices=choices, usage=usage)


def _best(choices: list[CompletionChoice], done: Sequence[Collected], fanout: Fanout) -> list[CompletionChoice]:
    """Per prompt, the n samples of highest cumulative logprob (of their generated tokens), best first."""
    best = []
    for first in range(0, len(choices), fanout.samples):
        group = range(first, first + fanout.samples)
        ranked = sorted(group, key=lambda k: -sum(lp.logprob for d in done[k].deltas for lp in d.logprobs))
        best += [choices[k] for k in ranked[: fanout.n]]
    return best


class _Shaper:
    """A choice's text and logprobs from its engine events: the echoed prompt first, when asked."""

    def __init__(self, body: CompletionRequest, fanout: Fanout, gen: Generator) -> None:
        self._body = body
        self._fanout = fanout
        self._gen = gen
        self.names = TokenNames(gen.token_text, gen.token_bytes, body.return_tokens_as_token_ids)

    def prompt_text(self, wanted: GenerationRequest, prompt_ids: Sequence[int]) -> str:
        """The prompt as given, or a token-id (or truncated) prompt decoded."""
        if isinstance(wanted.prompt, str) and self._body.truncate_prompt_tokens is None:
            return wanted.prompt
        return self._gen.tokenizer.decode(list(prompt_ids), skip_special_tokens=self._body.skip_special_tokens)

    def part(
        self, k: int, text: str, logprobs: Sequence[TokenLogprob], offset: int,
        prompt_ids: Sequence[int] = (), prompt_lps: Sequence[TokenLogprob] = (), first: bool = False,
    ) -> tuple[str, list[tuple[int, TokenLogprob | None]], PromptLogprobs | None]:
        """Choice k's text and logprob entries for some events; first: they begin the choice (echo adds the
        prompt). Also vLLM's prompt_logprobs when asked for (on the first part)."""
        body = self._body
        if self._fanout.drop_generated:
            text, logprobs = "", ()
        entries = generated(logprobs)
        if first and body.echo:
            text = self.prompt_text(self._fanout.requests[k], prompt_ids) + text
            entries = echoed(prompt_ids, prompt_lps) + entries
        shaped = None
        if first and body.prompt_logprobs is not None:
            shaped = prompt_logprobs(prompt_ids, prompt_lps, self.names)
        return text, entries, shaped

    def choice(self, k: int, done: Collected) -> CompletionChoice:
        prompt_ids = done.deltas[0].prompt_token_ids if done.deltas else done.end.prompt_token_ids
        prompt_lps = [lp for d in done.deltas for lp in d.prompt_logprobs]
        logprobs = [lp for d in done.deltas for lp in d.logprobs]
        text, entries, shaped = self.part(k, done.text, logprobs, 0, prompt_ids, prompt_lps, first=True)
        return CompletionChoice(
            index=k, text=text, finish_reason=FINISH_REASONS[done.end.finish_reason], stop_reason=done.end.stop_reason,
            logprobs=None if self._body.logprobs is None else completion_logprobs(entries, self.names, 0)[0],
            prompt_logprobs=shaped,
        )


async def _chunks(
    body: CompletionRequest, fanout: Fanout, shaper: _Shaper, samples: Samples, gen: Generator, metrics: HttpMetrics,
    completion_id: str,
) -> AsyncIterator[str]:
    """Chunks carry their choice's index; with echo a choice's first chunk starts with its prompt."""
    created = int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        if usage is None and body.continuous_usage:
            usage = samples.usage(fanout.samples)
            if fanout.drop_generated:
                usage = Usage.counts(usage.prompt_tokens, 0)
        return sse(Completion(id=completion_id, created=created, model=gen.model_name, choices=choices, usage=usage))

    offsets = [0] * len(fanout.requests)  # text_offset counts the token texts, as the non-streamed logprobs do
    started: set[int] = set()
    ends: list[GenerationEnd] = []
    async for k, event in samples.merged():
        first = k not in started
        started.add(k)
        if isinstance(event, TextDelta):
            text, entries, shaped = shaper.part(
                k, event.text, event.logprobs, offsets[k], event.prompt_token_ids, event.prompt_logprobs, first
            )
        else:
            text, entries, shaped = shaper.part(k, "", (), offsets[k], event.prompt_token_ids, (), first)
        logprobs = None
        if body.logprobs is not None and entries:
            logprobs, offsets[k] = completion_logprobs(entries, shaper.names, offsets[k])
        if text or logprobs is not None or shaped is not None:
            yield chunk([CompletionChoice(index=k, text=text, logprobs=logprobs, prompt_logprobs=shaped)])
        if isinstance(event, GenerationEnd):
            metrics.finished(event)
            ends.append(event)
            reason = FINISH_REASONS[event.finish_reason]
            yield chunk([CompletionChoice(index=k, text="", finish_reason=reason, stop_reason=event.stop_reason)])
    if body.include_usage:
        completion_tokens = 0 if fanout.drop_generated else sum(e.completion_tokens for e in ends)
        yield chunk([], Usage.counts(samples.usage(fanout.samples).prompt_tokens, completion_tokens))
