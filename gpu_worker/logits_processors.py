"""Logits processors applied before temperature, top-k and top-p: min_tokens and the penalties.

Each returns a new tensor (the raw logits stay intact for logprobs), or its input unchanged when no
row asks for the feature, so rows without features cost a Python check per row and nothing more.
"""

from collections.abc import Sequence
from itertools import chain

import torch

from apex_serve.types import SamplingParams


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


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
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))  # [rows, vocab]


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
