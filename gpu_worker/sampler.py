"""Token sampling: min_tokens, allowed_token_ids, bad words and penalties, then the grammar of structured outputs,
then greedy, or temperature, min-p, top-k and top-p; seeded requests reproducible per token index; logprobs of the
raw logits."""

from collections.abc import Sequence

import torch

from apex_serve.types import SamplingParams, TokenLogprob
from gpu_worker.grammar import GrammarMask
from gpu_worker.logits_processors import (
    apply_penalties,
    ban_bad_words,
    restrict_to_allowed,
    suppress_stop_tokens,
    uses_penalties,
)

_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def token_seed(seed: int, output_index: int) -> int:
    """Generator seed of the output token number output_index of a request seeded with seed."""
    return _splitmix64(_splitmix64(seed) ^ output_index)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k [rows] (0: off) and top-p [rows] drop from logits [rows, vocab]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(logits.shape[-1], device=logits.device)  # [vocab]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])  # [rows]
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # [rows, vocab]
    before = probs.cumsum(dim=-1) - probs  # [rows, vocab] mass strictly above each token
    drop = (before > top_p[:, None]) & (top_p[:, None] < 1.0)  # [rows, vocab]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)  # [rows, vocab]


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the tokens of logits [rows, vocab] less likely than min_p [rows] times the likeliest one."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [rows, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))  # [rows, vocab]


def compute_logprobs(
    logits: torch.Tensor, params: Sequence[SamplingParams], tokens: Sequence[int]
) -> dict[int, TokenLogprob]:
    """By row, for the rows that ask for logprobs: the sampled token's and the top n under log_softmax of
    the raw logits [rows, vocab] (fp32, before penalties, min_tokens, the grammar's mask, temperature, top-k and
    top-p: a constrained row's logprobs are those of the model's own distribution)."""
    wanted = {i: p.logprobs for i, p in enumerate(params) if p.logprobs is not None}  # row -> top n
    if not wanted:
        return {}
    index = torch.tensor(list(wanted), device=logits.device)  # [lp]
    logprobs = logits[index].log_softmax(dim=-1)  # [lp, vocab]
    sampled = torch.tensor([tokens[i] for i in wanted], device=logits.device)  # [lp]
    chosen = logprobs.gather(1, sampled[:, None])[:, 0].tolist()  # [lp]
    num_top = min(max(wanted.values()), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [lp, num_top], most likely first
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return {
        i: TokenLogprob(tokens[i], chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n])))
        for j, (i, n) in enumerate(wanted.items())
    }


class Sampler:
    """Samples one token per row. Unseeded rows draw from one generator seeded once with `seed`.

    eos_token_ids: the model's, masked (with each row's stop_token_ids) for rows short of min_tokens.
    """

    def __init__(self, seed: int, device: torch.device, eos_token_ids: Sequence[int] = ()) -> None:
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_indices: Sequence[int],
        token_ids: Sequence[Sequence[int]] | None = None,
        grammar: GrammarMask | None = None,
    ) -> list[int]:
        """Tokens for logits [rows, vocab] (fp32, left unchanged); output_indices: output tokens each row has
        so far; token_ids: each row's prompt then output tokens, needed only when a row uses a penalty or bad
        words; grammar: the tokens the constrained rows may take, in addition to their other restrictions."""
        raw = logits  # [rows, vocab]
        logits = suppress_stop_tokens(logits, params, output_indices, self.eos_token_ids)  # [rows, vocab]
        logits = restrict_to_allowed(logits, params)  # [rows, vocab]
        if token_ids is None:
            if any(uses_penalties(p) or p.bad_words_token_ids for p in params):
                raise ValueError("token_ids: needed by rows with bad words or a repetition, frequency or presence "
                                 "penalty")
        else:
            logits = ban_bad_words(logits, params, output_indices, token_ids)  # [rows, vocab]
            logits = apply_penalties(logits, params, output_indices, token_ids)  # [rows, vocab]
        if grammar is not None:
            logits = grammar.apply(logits, raw)  # [rows, vocab]
        tokens = logits.argmax(dim=-1)  # [rows]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if not rows:
            return tokens.tolist()
        index = torch.tensor(rows, device=logits.device)  # [sampled]
        temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)  # [sampled]
        top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)  # [sampled]
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)  # [sampled]
        scaled = logits[index] / temperature[:, None]  # [sampled, vocab]
        if any(params[i].min_p > 0.0 for i in rows):
            min_p = torch.tensor([params[i].min_p for i in rows], device=logits.device)  # [sampled]
            scaled = filter_min_p(scaled, min_p)  # [sampled, vocab]
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
            scaled = filter_logits(scaled, top_k, top_p)  # [sampled, vocab]
        probs = scaled.softmax(dim=-1)  # [sampled, vocab]
        noise = self._exponential_noise([params[i].seed for i in rows], [output_indices[i] for i in rows], probs)
        tokens[index] = (probs / noise).argmax(dim=-1)  # exponential race: P(token) = probs
        return tokens.tolist()

    def _exponential_noise(
        self, seeds: list[int | None], output_indices: list[int], probs: torch.Tensor
    ) -> torch.Tensor:
        """Exp(1) noise [sampled, vocab]: seeded rows from their own generator, the rest from the shared one."""
        noise = torch.empty_like(probs)  # [sampled, vocab]
        unseeded = [i for i, seed in enumerate(seeds) if seed is None]
        if unseeded:
            noise[unseeded] = torch.empty(
                (len(unseeded), probs.shape[-1]), device=probs.device, dtype=probs.dtype
            ).exponential_(generator=self._generator)
        for i, seed in enumerate(seeds):
            if seed is not None:
                generator = torch.Generator(device=probs.device)
                generator.manual_seed(token_seed(seed, output_indices[i]))
                noise[i].exponential_(generator=generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
