"""Engine logprobs (token ids) in OpenAI's two shapes, with token texts from the tokenizer."""

from collections.abc import Callable, Sequence

from apex_serve.types import TokenLogprob
from gateway.http_api import responses

TokenText = Callable[[int], str]
_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same floor


def _value(logprob: float) -> float:
    return max(logprob, _FLOOR)


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], token_text: TokenText, offset: int
) -> responses.CompletionLogprobs:
    """top_logprobs holds the sampled token and the top n, as OpenAI's (texts that collide keep the first)."""
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = []
    for lp in logprobs:
        top: dict[str, float] = {}
        for token_id, value in ((lp.token_id, lp.logprob), *lp.top):
            top.setdefault(token_text(token_id), _value(value))
        tops.append(top)
    return responses.CompletionLogprobs(
        tokens=tokens, token_logprobs=[_value(lp.logprob) for lp in logprobs], top_logprobs=tops, text_offset=offsets
    )


def _top(token_id: int, logprob: float, token_text: TokenText) -> responses.TopLogprob:
    text = token_text(token_id)
    return responses.TopLogprob(token=text, logprob=_value(logprob), bytes=list(text.encode()))


def chat_logprobs(logprobs: Sequence[TokenLogprob], token_text: TokenText) -> responses.ChatLogprobs:
    return responses.ChatLogprobs(
        content=[
            responses.TokenLogprob(
                **_top(lp.token_id, lp.logprob, token_text).model_dump(),
                top_logprobs=[_top(t, v, token_text) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )
