"""The LM head over a step's kept rows: the sampling rows' logits, and the prompt logprobs of the prefill rows that
ask for them (log_softmax of the fp32 logits, the model's raw distribution, as vLLM's prompt_logprobs)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apex_serve.types import TokenLogprob
from gpu_worker.step_batch import PromptSpan, SubBatch

# kept rows whose logits one slice of the prompt logprobs materialises: a 32k vocabulary costs 64 MiB in fp32
PROMPT_SLICE_ROWS = 512


@dataclass(frozen=True)
class StepLogits:
    """What the forward's LM head yields for a step."""

    logits: torch.Tensor  # [num_sampling, vocab] fp32, in the order of the sub-batches' sampling_ids
    prompt_logprobs: dict[str, tuple[TokenLogprob, ...]]  # by request: the prompt tokens its step's positions predict


def lm_head(batches: list[SubBatch], normed: torch.Tensor, weight: torch.Tensor) -> StepLogits:
    """The logits of the sampling rows and the prompt logprobs of normed [kept rows of every sub-batch, hidden] (the
    final norm's output, the sub-batches' kept_rows concatenated) under the LM head weight [vocab, hidden]."""
    if not any(b.prompt_spans for b in batches):  # the kept rows are the sampling rows
        return StepLogits(F.linear(normed, weight).float(), {})  # [num_sampling, vocab]
    offsets = []
    offset = 0
    for batch in batches:
        offsets.append(offset)
        offset += batch.kept_rows.shape[0]
    sample_rows = torch.cat([b.sample_rows + o for b, o in zip(batches, offsets)])  # [num_sampling]
    logits = F.linear(normed[sample_rows], weight).float()  # [num_sampling, vocab]
    spans = [(span, o + span.first) for b, o in zip(batches, offsets) for span in b.prompt_spans]
    return StepLogits(logits, prompt_logprobs(normed, weight, spans))


def prompt_logprobs(
    normed: torch.Tensor, weight: torch.Tensor, spans: list[tuple[PromptSpan, int]]
) -> dict[str, tuple[TokenLogprob, ...]]:
    """By request, each span's TokenLogprobs: the logprobs of its targets under log_softmax of the fp32 logits of
    the rows of normed [rows, hidden] from its first row (the int beside it) on, with its top most likely tokens;
    PROMPT_SLICE_ROWS rows at a time."""
    device = normed.device
    rows = torch.cat([torch.arange(first, first + len(s.targets), device=device) for s, first in spans])  # [n]
    targets = torch.tensor([t for s, _ in spans for t in s.targets], dtype=torch.long, device=device)  # [n]
    num_top = min(max(s.top for s, _ in spans), weight.shape[0])
    chosen: list[float] = []
    top_ids: list[list[int]] = []
    top_values: list[list[float]] = []
    for start in range(0, rows.shape[0], PROMPT_SLICE_ROWS):
        part = slice(start, start + PROMPT_SLICE_ROWS)
        logprobs = F.linear(normed[rows[part]], weight).float().log_softmax(dim=-1)  # [slice, vocab]
        chosen += logprobs.gather(1, targets[part, None])[:, 0].tolist()
        values, ids = logprobs.topk(num_top, dim=-1)  # [slice, num_top], most likely first
        top_values += values.tolist()
        top_ids += ids.tolist()
    out = {}
    i = 0
    for span, _ in spans:
        out[span.request_id] = tuple(
            TokenLogprob(target, chosen[j], tuple(zip(top_ids[j][: span.top], top_values[j][: span.top])))
            for j, target in enumerate(span.targets, start=i)
        )
        i += len(span.targets)
    return out
