"""Request checks that need the model's limits; range checks live in SamplingParams."""

from collections.abc import Iterable

from apex_serve.errors import InvalidArgument, NotFound
from apex_serve.types import SamplingParams


def check_model(requested: str, served: str) -> None:
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
