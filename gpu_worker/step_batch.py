"""What the gpu_worker keeps per request between steps, and the token layout of one step's sub-batch."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from apex_serve.types import Placement, SamplingParams
from gpu_worker.attention import AttentionMetadata
from gpu_worker.device_inputs import to_device_together
from gpu_worker.grammar import RequestGrammar


@dataclass
class RequestState:
    token_ids: list[int]  # prompt, then every token sampled for it
    num_prompt_tokens: int
    sampling: SamplingParams
    block_ids: list[int]  # in the pool of `placement`
    placement: Placement
    num_computed_tokens: int = 0  # tokens of token_ids whose KV is in the pool
    num_prefill_tokens: int = 0  # len(token_ids) at admission: prefilled (maybe in chunks) before the first sample
    grammar: RequestGrammar | None = None  # the matcher of a request with a structured_grammar, past its outputs

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prefilling(self) -> bool:
        """Its prefill is chunked and has tokens left: the next step must schedule a chunk, not a decode row."""
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def num_cached_tokens(self) -> int:
        """Tokens whose KV is in the pool between steps: all but the last sampled one once prefilled."""
        return self.num_computed_tokens


@dataclass(frozen=True)
class Scheduled:
    """The tokens one step computes for a request: token_ids[start:end] at positions [start, end)."""

    request_id: str
    start: int
    end: int
    prefill: bool  # a prefill row (a new request's first tokens or a chunk), else a decode row of one token
    samples: bool  # the tokens reach the end of its token_ids (a decode row, a whole prompt, a last chunk)


@dataclass(frozen=True)
class ContextLoad:
    """The earlier KV of a CPU-placed chunk: the first `tokens` positions of the request, in CPU-pool `blocks`."""

    row: int  # the chunk's prefill row in layout order
    blocks: torch.Tensor  # [ceil(tokens / block_size)] CPU-pool block ids, on the host
    tokens: int


@dataclass(frozen=True)
class PromptSpan:
    """The prompt logprobs one prefill row computes: the logprobs of `targets`, the prompt tokens its positions
    predict, from the kept rows first, first + 1, ..., with the `top` most likely tokens at each."""

    request_id: str
    first: int  # index among the sub-batch's kept_rows of the position predicting targets[0]
    targets: tuple[int, ...]
    top: int


@dataclass(frozen=True)
class SubBatch:
    """One sub-batch of a step. Tokens are laid out: prefill rows (whole prompts or chunks) whose KV goes to the CPU
    pool, prefill rows whose KV stays in the accelerator pool, accelerator decode rows, then CPU decode rows (the
    tail, attended by the CPU). Only some tokens go through the last layer's O-proj and MLP and the LM head: the kept
    rows, in layout order: the sampling prefill rows' last tokens and every token of a prefill row that computes
    prompt logprobs, then every decode row. sample_rows picks each sampling request's last token among them."""

    slot: int  # staging slot of its CPU rows: the sub-batch index
    scheduled: list[Scheduled]  # in layout order
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    kept_rows: torch.Tensor  # [num_kept] token indices, ascending
    sample_rows: torch.Tensor  # [num_sampling] index among kept_rows of each sampling request's last token
    prompt_spans: tuple[PromptSpan, ...]  # the prefill rows that compute prompt logprobs, in layout order
    num_cpu_prefill_tokens: int
    num_prefill_kept: int  # prefill tokens among kept_rows
    num_cpu_decodes: int
    device_metadata: AttentionMetadata  # prefills and accelerator decodes; slots of accelerator-pool tokens
    cpu_prefill_blocks: torch.Tensor  # [num_cpu_prefill_tokens] CPU-pool block of each CPU prefill token
    cpu_prefill_offsets: torch.Tensor  # [num_cpu_prefill_tokens]
    cpu_context_loads: tuple[ContextLoad, ...]  # CPU-placed chunks with earlier KV in the CPU pool
    cpu_block_tables: np.ndarray  # [num_cpu_decodes, max_blocks_per_row] int32, padded with 0
    cpu_context_lens: np.ndarray  # [num_cpu_decodes] int32, including the current token
    cpu_slot_mapping: np.ndarray  # [num_cpu_decodes] int64, block * block_size + offset of the current token

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_prefill_tokens(self) -> int:
        return self.device_metadata.num_prefill_tokens

    @property
    def device_end(self) -> int:
        """Tokens [0, device_end) are attended on the accelerator, the rest by the CPU."""
        return self.num_tokens - self.num_cpu_decodes

    @property
    def sampling_ids(self) -> list[str]:
        """The requests with a logits row, in the order of sample_rows."""
        return [s.request_id for s in self.scheduled if s.samples]


def schedule(request_id: str, request: RequestState, num_scheduled_tokens: int, new: bool) -> Scheduled:
    """The tokens a step computes for a request (state as the plan found it): a new request prefills from position 0
    (num_scheduled_tokens of it, all when 0); a cached one prefills its next num_scheduled_tokens > 0, or decodes
    its last token (0)."""
    if new or num_scheduled_tokens:
        start = request.num_computed_tokens
        end = start + num_scheduled_tokens if num_scheduled_tokens else len(request.token_ids)
        return Scheduled(request_id, start, end, True, end == len(request.token_ids))
    end = len(request.token_ids)
    return Scheduled(request_id, end - 1, end, False, True)


def layout_sub_batch(
    slot: int,
    scheduled: list[Scheduled],
    requests: dict[str, RequestState],
    block_size: int,
    max_blocks_per_row: int,
    device: torch.device,
) -> SubBatch:
    """Lay out one sub-batch's scheduled tokens; their state is already in requests."""
    def key(s: Scheduled) -> int:
        placement = requests[s.request_id].placement
        if s.prefill:
            return 0 if placement is Placement.CPU else 1
        return 2 if placement is Placement.GPU else 3

    order = sorted(scheduled, key=key)
    prefills = [s for s in order if s.prefill]
    input_ids: list[int] = []
    positions: list[int] = []
    kept: list[int] = []
    sample_rows: list[int] = []
    spans: list[PromptSpan] = []
    slots: dict[Placement, list[tuple[int, int]]] = {Placement.GPU: [], Placement.CPU: []}
    tables: dict[Placement, list[list[int]]] = {Placement.GPU: [], Placement.CPU: []}
    context_lens: dict[Placement, list[int]] = {Placement.GPU: [], Placement.CPU: []}
    context_tables: list[list[int]] = []
    loads: list[ContextLoad] = []
    for row, s in enumerate(prefills):
        request = requests[s.request_id]
        context_blocks = request.block_ids[: -(-s.start // block_size)]
        on_cpu = request.placement is Placement.CPU
        context_tables.append([] if on_cpu else context_blocks)
        if on_cpu and s.start:
            loads.append(ContextLoad(row, torch.tensor(context_blocks, dtype=torch.long), s.start))
        first = len(input_ids)
        input_ids.extend(request.token_ids[s.start : s.end])
        positions.extend(range(s.start, s.end))
        slots[request.placement].extend(
            (request.block_ids[p // block_size], p % block_size) for p in range(s.start, s.end)
        )
        top = request.sampling.prompt_logprobs
        if top is not None and request.num_output_tokens == 0:
            # positions [start, min(end, P - 1)) predict prompt tokens start + 1 .. min(end, P - 1)
            targets = tuple(request.token_ids[s.start + 1 : min(s.end, request.num_prompt_tokens - 1) + 1])
            if targets:
                spans.append(PromptSpan(s.request_id, len(kept), targets, top))
            kept.extend(range(first, len(input_ids)))
        elif s.samples:
            kept.append(len(input_ids) - 1)
        if s.samples:
            sample_rows.append(len(kept) - 1)
    num_prefill_kept = len(kept)
    for s in order[len(prefills) :]:
        request = requests[s.request_id]
        position = s.start
        input_ids.append(request.token_ids[position])
        positions.append(position)
        sample_rows.append(len(kept))
        kept.append(len(input_ids) - 1)
        slots[request.placement].append((request.block_ids[position // block_size], position % block_size))
        tables[request.placement].append(request.block_ids[: position // block_size + 1])
        context_lens[request.placement].append(position + 1)
    num_cpu_prefill_tokens = sum(s.end - s.start for s in prefills if requests[s.request_id].placement is Placement.CPU)
    gpu_slots = slots[Placement.GPU]
    cpu_prefill_slots = slots[Placement.CPU][:num_cpu_prefill_tokens]
    cpu_decode_slots = slots[Placement.CPU][num_cpu_prefill_tokens:]
    cpu_tables = np.zeros((len(tables[Placement.CPU]), max_blocks_per_row), dtype=np.int32)
    for row, table in enumerate(tables[Placement.CPU]):
        cpu_tables[row, : len(table)] = table
    rows = [torch.tensor(values, dtype=torch.long) for values in (input_ids, positions, kept, sample_rows)]
    sent: list[torch.Tensor] = []

    def send(metadata: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # one copy: the rows' inputs and the metadata's
        together = to_device_together([*rows, *metadata], device)
        sent.extend(together[: len(rows)])
        return together[len(rows) :]

    metadata = AttentionMetadata.build(
        prefill_lens=[s.end - s.start for s in prefills],
        slot_blocks=[b for b, _ in gpu_slots],
        slot_offsets=[o for _, o in gpu_slots],
        decode_block_tables=tables[Placement.GPU],
        decode_context_lens=context_lens[Placement.GPU],
        block_size=block_size,
        device=device,
        prefill_contexts=[s.start for s in prefills],
        context_block_tables=context_tables,
        send=send,
    )
    device_ids, device_positions, device_kept, device_sample_rows = sent
    return SubBatch(
        slot=slot,
        scheduled=order,
        input_ids=device_ids,  # [num_tokens]
        positions=device_positions,  # [num_tokens]
        kept_rows=device_kept,  # [num_kept]
        sample_rows=device_sample_rows,  # [num_sampling]
        prompt_spans=tuple(spans),
        num_cpu_prefill_tokens=num_cpu_prefill_tokens,
        num_prefill_kept=num_prefill_kept,
        num_cpu_decodes=len(tables[Placement.CPU]),
        device_metadata=metadata,
        cpu_prefill_blocks=torch.tensor([b for b, _ in cpu_prefill_slots], dtype=torch.long),
        cpu_prefill_offsets=torch.tensor([o for _, o in cpu_prefill_slots], dtype=torch.long),
        cpu_context_loads=tuple(loads),
        cpu_block_tables=cpu_tables,
        cpu_context_lens=np.array(context_lens[Placement.CPU], dtype=np.int32),
        cpu_slot_mapping=np.array([b * block_size + o for b, o in cpu_decode_slots], dtype=np.int64),
    )

