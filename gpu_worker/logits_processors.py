"""Logits processors applied before temperature, min-p, top-k and top-p: min_tokens, allowed_token_ids,
bad words and the penalties.

Each returns a new tensor (the raw logits stay intact for logprobs), or its input unchanged when no
row asks for the feature, so rows without features cost a Python check per row and nothing more.
"""

from collections.abc import Sequence
from itertools import chain

import torch

from apex_serve.types import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def _mask_columns(logits: torch.Tensor, rows: list[int], columns: list[int]) -> torch.Tensor:
    """-inf at (rows[i], columns[i]) of logits [rows, vocab], as a new tensor; the input when there are none."""
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))  # [rows, vocab]


def suppress_stop_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """-inf for the EOS ids (even with ignore_eos) and stop_token_ids of rows short of min_tokens.

    logits: [rows, vocab]; output_indices: output tokens each row has so far.
    """
    vocab = logits.shape[-1]
    rows: list[int] = []
    columns: list[int] = []
    for row, (p, num_outputs) in enumerate(zip(params, output_indices, strict=True)):
        if num_outputs < p.min_tokens:
            banned = {t for t in chain(eos_token_ids, p.stop_token_ids) if t < vocab}
            rows.extend([row] * len(banned))
            columns.extend(banned)
    return _mask_columns(logits, rows, columns)


def restrict_to_allowed(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """-inf for every token outside allowed_token_ids, in the rows that give them. logits: [rows, vocab]."""
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    keep_rows: list[int] = []
    keep_columns: list[int] = []
    for j, i in enumerate(rows):
        allowed = [t for t in params[i].allowed_token_ids if t < vocab]
        keep_rows.extend([j] * len(allowed))
        keep_columns.extend(allowed)
    banned = torch.ones((len(rows), vocab), dtype=torch.bool, device=logits.device)  # [restricted, vocab]
    keep = (
        torch.tensor(keep_rows, dtype=torch.long, device=logits.device),
        torch.tensor(keep_columns, dtype=torch.long, device=logits.device),
    )
    banned[keep] = False
    index = torch.tensor(rows, device=logits.device)  # [restricted]
    return logits.index_copy(0, index, logits[index].masked_fill(banned, float("-inf")))  # [rows, vocab]


def banned_by_bad_words(
    bad_words_token_ids: Sequence[Sequence[int]], token_ids: Sequence[int], num_outputs: int
) -> set[int]:
    """The last token of each bad word whose other tokens end the output (the last num_outputs of token_ids)."""
    banned: set[int] = set()
    for word in bad_words_token_ids:
        prefix = len(word) - 1
        if prefix > num_outputs:
            continue
        if prefix == 0 or list(token_ids[len(token_ids) - prefix :]) == list(word[:-1]):
            banned.add(word[-1])
    return banned


def ban_bad_words(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """-inf for the token that would complete a bad word, as vLLM: a word's earlier tokens are matched
    against the output tokens only. logits: [rows, vocab]; token_ids: each row's prompt then output tokens."""
    vocab = logits.shape[-1]
    rows: list[int] = []
    columns: list[int] = []
    for row, p in enumerate(params):
        if p.bad_words_token_ids:
            banned = [t for t in banned_by_bad_words(p.bad_words_token_ids, token_ids[row], output_indices[row])
                      if t < vocab]
            rows.extend([row] * len(banned))
            columns.extend(banned)
    return _mask_columns(logits, rows, columns)


def token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: [len(token_lists), vocab] int64."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists])  # [lists]
    tokens = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long)  # [total]
    owners = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)  # [total]
    flat = (owners * vocab + tokens).to(device)  # [total] built on the host, one copy to the device
    return torch.bincount(flat, minlength=len(token_lists) * vocab).view(len(token_lists), vocab)


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
    token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens, then frequency and presence over output tokens.

    logits: [rows, vocab]; token_ids: each row's prompt then its output_indices[row] output tokens.
    Counts are built only for the rows that use a penalty. Order and formulas follow vLLM.
    """
    rows = [i for i, p in enumerate(params) if uses_penalties(p)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    splits = [len(token_ids[i]) - output_indices[i] for i in rows]
    prompt_counts = token_counts([token_ids[i][:s] for i, s in zip(rows, splits)], vocab, device)  # [pen, vocab]
    output_counts = token_counts([token_ids[i][s:] for i, s in zip(rows, splits)], vocab, device)  # [pen, vocab]
    repetition = torch.tensor([params[i].repetition_penalty for i in rows], device=device)[:, None]  # [pen, 1]
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]  # [pen, 1]
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]  # [pen, 1]
    index = torch.tensor(rows, device=device)  # [pen]
    penalised = logits[index]  # [pen, vocab]
    seen = (prompt_counts > 0) | (output_counts > 0)  # [pen, vocab]
    scaled = torch.where(penalised > 0, penalised / repetition, penalised * repetition)  # [pen, vocab]
    penalised = torch.where(seen, scaled, penalised)
    penalised = penalised - frequency * output_counts - presence * (output_counts > 0)  # [pen, vocab]
    return logits.index_copy(0, index, penalised)  # [rows, vocab]
