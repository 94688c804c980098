"""Engine logprobs (token ids) in OpenAI's and vLLM's shapes, with token names from the tokenizer."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apex_serve.types import TokenLogprob
from gateway.http_api import responses

_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same floor


def _value(logprob: float) -> float:
    return max(logprob, _FLOOR)


@dataclass(frozen=True)
class TokenNames:
    """How tokens are named in logprobs. A token is named by its text, unless its bytes are not whole UTF-8
    characters (a part of a multi-byte character, whose text is U+FFFD): then by its bytes as OpenAI writes them,
    "bytes:\\xe4\\xbd", so that distinct tokens never share a name. as_token_ids (vLLM's
    return_tokens_as_token_ids): "token_id:123" for every token."""

    text: Callable[[int], str]
    raw: Callable[[int], bytes]
    as_token_ids: bool = False

    def name(self, token_id: int) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        text = self.text(token_id)
        if "\ufffd" not in text:
            return text
        raw = self.raw(token_id)
        try:
            if raw.decode() == text:  # the character U+FFFD itself
                return text
        except UnicodeDecodeError:
            pass
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def chat_entry(self, token_id: int, logprob: float) -> responses.TopLogprob:
        name = f"token_id:{token_id}" if self.as_token_ids else self.text(token_id)
        return responses.TopLogprob(token=name, logprob=_value(logprob), bytes=list(self.raw(token_id)))


def completion_logprobs(
    entries: Sequence[tuple[int, TokenLogprob | None]], names: TokenNames, offset: int
) -> tuple[responses.CompletionLogprobs, int]:
    """The legacy shape for (token id, its logprob) pairs, and the text offset after them. top_logprobs holds the
    token and the top n; a pair without a logprob (an echoed prompt's first token) has null ones. text_offset counts
    the token texts."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, lp in entries:
        tokens.append(names.name(token_id))
        offsets.append(offset)
        offset += len(names.text(token_id))
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_value(lp.logprob))
        top: dict[str, float] = {}
        for top_id, value in ((lp.token_id, lp.logprob), *lp.top):
            top.setdefault(names.name(top_id), _value(value))
        tops.append(top)
    shaped = responses.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
    return shaped, offset


def generated(logprobs: Sequence[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    return [(lp.token_id, lp) for lp in logprobs]


def echoed(prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's tokens, each after the first with its logprob when the engine gave them (one per token after
    the first), else none."""
    given = len(prompt_logprobs) == len(prompt_ids) - 1
    return [(t, prompt_logprobs[i - 1] if given and i else None) for i, t in enumerate(prompt_ids)]


def prompt_logprobs(
    prompt_ids: Sequence[int], logprobs: Sequence[TokenLogprob], names: TokenNames
) -> list[dict[str, responses.PromptLogprob] | None]:
    """vLLM's prompt_logprobs: null for the first token, then per token its own entry and the top k, keyed by token
    id. rank is 1-based among all tokens; for a token outside the top k it is unknown (null)."""
    shaped: list[dict[str, responses.PromptLogprob] | None] = [None]
    for lp in logprobs[: max(len(prompt_ids) - 1, 0)]:
        entry: dict[str, responses.PromptLogprob] = {}
        for rank, (token_id, value) in enumerate(sorted(lp.top, key=lambda top: -top[1]), start=1):
            entry[str(token_id)] = responses.PromptLogprob(
                logprob=_value(value), rank=rank, decoded_token=names.name(token_id)
            )
        if str(lp.token_id) not in entry:
            entry = {
                str(lp.token_id): responses.PromptLogprob(
                    logprob=_value(lp.logprob), rank=None, decoded_token=names.name(lp.token_id)
                ),
                **entry,
            }
        shaped.append(entry)
    return shaped if prompt_ids else []


def chat_logprobs(logprobs: Sequence[TokenLogprob], names: TokenNames) -> responses.ChatLogprobs:
    """bytes are the token's own bytes (a part of a character gives that part, not U+FFFD's UTF-8)."""
    return responses.ChatLogprobs(
        content=[
            responses.TokenLogprob(
                **names.chat_entry(lp.token_id, lp.logprob).model_dump(),
                top_logprobs=[names.chat_entry(t, v) for t, v in lp.top],
            )
            for lp in logprobs
        ]
    )
