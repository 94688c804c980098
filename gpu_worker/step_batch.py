"""What the gpu_worker keeps per request between steps, and the token layout of one step's sub-batch."""

from dataclasses import dataclass

import numpy as np
import torch

from apex_serve.types import Placement, SamplingParams
from gpu_worker.attention import AttentionMetadata


@dataclass
class RequestState:
    token_ids: list[int]  # prompt, then every token sampled for it
    num_prompt_tokens: int
    sampling: SamplingParams
    block_ids: list[int]  # in the pool of `placement`
    placement: Placement

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_cached_tokens(self) -> int:
        """Tokens whose KV is in the pool between steps: all but the last sampled one."""
        return len(self.token_ids) - 1


@dataclass(frozen=True)
class SubBatch:
    """One sub-batch of a step. Tokens are laid out: prefills whose KV goes to the CPU pool, prefills whose KV stays
    in the accelerator pool, accelerator decode rows, then CPU decode rows (the tail, attended by the CPU)."""

    slot: int  # staging slot of its CPU rows: the sub-batch index
    request_ids: list[str]  # in layout order
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    last_rows: torch.Tensor  # [num_requests] index of each request's last token
    num_cpu_prefill_tokens: int
    num_prefill_rows: int
    num_cpu_decodes: int
    device_metadata: AttentionMetadata  # prefills and accelerator decodes; slots of accelerator-pool tokens
    cpu_prefill_blocks: torch.Tensor  # [num_cpu_prefill_tokens] CPU-pool block of each CPU prefill token
    cpu_prefill_offsets: torch.Tensor  # [num_cpu_prefill_tokens]
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


def layout_sub_batch(
    slot: int,
    new_ids: list[str],
    cached_ids: list[str],
    requests: dict[str, RequestState],
    block_size: int,
    max_blocks_per_row: int,
    device: torch.device,
) -> SubBatch:
    """Lay out the new (prefill) and cached (decode) requests of one sub-batch; their state is already in requests."""
    by_place = {place: [r for r in new_ids if requests[r].placement is place] for place in Placement}
    decodes = {place: [r for r in cached_ids if requests[r].placement is place] for place in Placement}
    order = by_place[Placement.CPU] + by_place[Placement.GPU] + decodes[Placement.GPU] + decodes[Placement.CPU]
    input_ids: list[int] = []
    positions: list[int] = []
    last_rows: list[int] = []
    prefill_lens: list[int] = []
    slots: dict[Placement, list[tuple[int, int]]] = {Placement.GPU: [], Placement.CPU: []}
    tables: dict[Placement, list[list[int]]] = {Placement.GPU: [], Placement.CPU: []}
    context_lens: dict[Placement, list[int]] = {Placement.GPU: [], Placement.CPU: []}
    for request_id in by_place[Placement.CPU] + by_place[Placement.GPU]:
        request = requests[request_id]
        length = len(request.token_ids)
        input_ids.extend(request.token_ids)
        positions.extend(range(length))
        prefill_lens.append(length)
        slots[request.placement].extend((request.block_ids[p // block_size], p % block_size) for p in range(length))
        last_rows.append(len(input_ids) - 1)
    for request_id in decodes[Placement.GPU] + decodes[Placement.CPU]:
        request = requests[request_id]
        position = len(request.token_ids) - 1
        input_ids.append(request.token_ids[-1])
        positions.append(position)
        last_rows.append(len(input_ids) - 1)
        slots[request.placement].append((request.block_ids[position // block_size], position % block_size))
        tables[request.placement].append(request.block_ids[: position // block_size + 1])
        context_lens[request.placement].append(position + 1)
    num_cpu_prefill_tokens = sum(len(requests[r].token_ids) for r in by_place[Placement.CPU])
    gpu_slots = slots[Placement.GPU]
    cpu_prefill_slots = slots[Placement.CPU][:num_cpu_prefill_tokens]
    cpu_decode_slots = slots[Placement.CPU][num_cpu_prefill_tokens:]
    cpu_tables = np.zeros((len(tables[Placement.CPU]), max_blocks_per_row), dtype=np.int32)
    for row, table in enumerate(tables[Placement.CPU]):
        cpu_tables[row, : len(table)] = table
    return SubBatch(
        slot=slot,
        request_ids=order,
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        last_rows=torch.tensor(last_rows, dtype=torch.long, device=device),
        num_cpu_prefill_tokens=num_cpu_prefill_tokens,
        num_prefill_rows=len(prefill_lens),
        num_cpu_decodes=len(decodes[Placement.CPU]),
        device_metadata=AttentionMetadata.build(
            prefill_lens=prefill_lens,
            slot_blocks=[b for b, _ in gpu_slots],
            slot_offsets=[o for _, o in gpu_slots],
            decode_block_tables=tables[Placement.GPU],
            decode_context_lens=context_lens[Placement.GPU],
            block_size=block_size,
            device=device,
        ),
        cpu_prefill_blocks=torch.tensor([b for b, _ in cpu_prefill_slots], dtype=torch.long),
        cpu_prefill_offsets=torch.tensor([o for _, o in cpu_prefill_slots], dtype=torch.long),
        cpu_block_tables=cpu_tables,
        cpu_context_lens=np.array(context_lens[Placement.CPU], dtype=np.int32),
        cpu_slot_mapping=np.array([b * block_size + o for b, o in cpu_decode_slots], dtype=np.int64),
    )
