"""What a request may ask of this worker: the checks at admission (vocabulary, context length, the largest KV pool the
policy uses) and the peak they give it (where Request.take_token ends it). The step's token budget does not bound a
prompt: a longer one is prefilled in chunks."""

from collections.abc import Sequence
from dataclasses import dataclass

from apex_serve.errors import InvalidArgument
from apex_serve.types import SamplingParams
from scheduler_service.request import Request


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    largest_pool_tokens: int  # KV tokens the larger of the pools the policy uses holds
    largest_pool: str  # that pool and its size, as a message names them
    eos_token_ids: frozenset[int]

    def new_request(self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> Request:
        """The request, with its peak KV and stop tokens; InvalidArgument (naming the field and the limit) if it can
        never run here."""
        prompt = tuple(prompt_token_ids)
        # KV of every token but the last generated one, within the context length
        peak = min(len(prompt) + sampling.max_tokens, self.max_model_len) - 1
        self._check(prompt, sampling, peak)
        stop = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else self.eos_token_ids)
        return Request(request_id, prompt, sampling, peak, frozenset(stop))

    def _check(self, prompt: tuple[int, ...], sampling: SamplingParams, peak: int) -> None:
        if not prompt:
            raise InvalidArgument("prompt", "must not be empty")
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument("prompt", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        limit = self.max_model_len - 1
        if len(prompt) > limit:
            raise InvalidArgument(
                "prompt", f"{len(prompt)} tokens; the limit is {limit} (context length {self.max_model_len} less one "
                "for output)")
        pool = self.largest_pool_tokens
        if peak > pool:
            raise InvalidArgument(
                "prompt" if len(prompt) > pool else "max_tokens",
                f"{len(prompt)} prompt tokens and max_tokens {sampling.max_tokens} need KV for {peak} tokens; "
                f"the largest KV pool, {self.largest_pool}, holds {pool}, room for max_tokens "
                f"{max(pool + 1 - len(prompt), 0)} at most",
            )
