"""Request checks that need the model's limits; range checks live in SamplingParams."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apex_serve.errors import InvalidArgument, NotFound
from apex_serve.types import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one request may carry, checked before any tokenizing or template rendering
    (GatewayConfig's fields of the same names say why each exists)."""

    max_prompt_bytes: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 1024
    max_bad_words: int = 128
    max_chat_messages: int = 2048
    max_batch_prompts: int = 256
    max_samples: int = 16


def check_samples(field: str, value: int, limits: RequestLimits) -> None:
    """n or best_of: samples per prompt, each one engine request."""
    if not 1 <= value <= limits.max_samples:
        raise InvalidArgument(field, f"must be in [1, {limits.max_samples}] (max_samples), got {value}")


def check_batch_size(num_prompts: int, limits: RequestLimits) -> None:
    if not 1 <= num_prompts <= limits.max_batch_prompts:
        raise InvalidArgument(
            "prompt", f"a batch of {num_prompts} prompts; it must hold 1 to {limits.max_batch_prompts} "
                      f"(max_batch_prompts)"
        )


def utf8_size(field: str, text: str) -> int:
    """The text's size in UTF-8 bytes; InvalidArgument naming the field when it cannot be encoded (a lone
    surrogate, as JSON's "\\ud800" escape decodes to)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            field, f"is not valid UTF-8: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
        ) from None


def check_text_size(field: str, text: str, max_bytes: int, limit_name: str = "max_prompt_bytes") -> None:
    """Valid UTF-8 of at most max_bytes; a text with more characters than that is refused without encoding it."""
    if len(text) > max_bytes or utf8_size(field, text) > max_bytes:
        raise InvalidArgument(field, f"{_size(text)} exceeds the limit of {max_bytes} bytes ({limit_name})")


def _size(text: str) -> str:
    try:
        return f"{len(text.encode())} bytes"
    except UnicodeEncodeError:
        return f"{len(text)} characters"


def check_stop_strings(stop: Sequence[str], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(
            "stop", f"{len(stop)} stop strings exceeds the limit of {limits.max_stop_strings} (max_stop_strings)"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument("stop", "stop strings must not be empty")
        check_text_size(f"stop[{i}]", s, limits.max_stop_string_bytes, "max_stop_string_bytes")


def check_bad_words(words: Sequence[str], limits: RequestLimits) -> None:
    """At most max_bad_words, each valid UTF-8 of at most max_stop_string_bytes: before any is tokenized."""
    if len(words) > limits.max_bad_words:
        raise InvalidArgument(
            "bad_words", f"{len(words)} words exceeds the limit of {limits.max_bad_words} (max_bad_words)"
        )
    for i, word in enumerate(words):
        check_text_size(f"bad_words[{i}]", word, limits.max_stop_string_bytes, "max_stop_string_bytes")


def check_messages(messages: Sequence[Mapping[str, Any]], limits: RequestLimits) -> None:
    """Message count, valid UTF-8 in every string, and the strings' total size against max_prompt_bytes:
    all before the chat template renders them."""
    if len(messages) > limits.max_chat_messages:
        raise InvalidArgument(
            "messages", f"{len(messages)} messages exceeds the limit of {limits.max_chat_messages} (max_chat_messages)"
        )
    total = 0
    for i, message in enumerate(messages):
        for path, text in _strings(f"messages[{i}]", message):
            total += len(text) if total + len(text) > limits.max_prompt_bytes else utf8_size(path, text)
            if total > limits.max_prompt_bytes:
                raise InvalidArgument(
                    "messages", f"more than {limits.max_prompt_bytes} bytes of text exceeds the limit of "
                                f"{limits.max_prompt_bytes} bytes (max_prompt_bytes)"
                )


def _strings(path: str, value: Any) -> Iterable[tuple[str, str]]:
    """Every string in a message, with its path (messages[0].content, messages[1].tool_calls[0].function.name)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(f"{path}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for j, item in enumerate(value):
            yield from _strings(f"{path}[{j}]", item)


def check_model(requested: str, served: str) -> None:
    utf8_size("model", requested)
    if requested and requested != served:
        raise NotFound(f"model '{requested}' is not served here; this server serves '{served}'")


def check_prompt_text(prompt: str) -> None:
    if not prompt:
        raise InvalidArgument("prompt", "must not be empty")


def check_lengths(num_prompt_tokens: int, sampling: SamplingParams, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise InvalidArgument(
            "prompt",
            f"{num_prompt_tokens} tokens; the context length is {max_model_len} tokens and at least "
            f"one must remain for output (limit {max_model_len - 1} prompt tokens)",
        )
    room = max_model_len - num_prompt_tokens
    if sampling.max_tokens > room:
        raise InvalidArgument(
            "max_tokens",
            f"{sampling.max_tokens} exceeds the limit of {room} for this prompt "
            f"(context length {max_model_len} - {num_prompt_tokens} prompt tokens)",
        )


def check_prompt_ids(prompt_ids: list[int], vocab_size: int) -> None:
    if not prompt_ids:
        raise InvalidArgument("prompt", "must not be empty")
    check_token_ids("prompt", prompt_ids, vocab_size)


def check_token_ids(field: str, token_ids: Iterable[int], vocab_size: int) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidArgument(field, f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_sampling_token_ids(sampling: SamplingParams, vocab_size: int) -> None:
    """The token ids a request names (after its bad words are tokenized) are in the vocabulary."""
    check_token_ids("stop_token_ids", sampling.stop_token_ids, vocab_size)
    check_token_ids("allowed_token_ids", sampling.allowed_token_ids, vocab_size)
    check_token_ids("bad_words", (t for word in sampling.bad_words_token_ids for t in word), vocab_size)
