"""Attention over a ragged batch: prefill rows attend causally to their own tokens (and a chunk also to the request's
earlier KV), decode rows read the paged cache.

Tokens are laid out prefill rows first (each request's tokens contiguous), then one token per decode row. The caller
writes the new k/v into whichever pool each row lives in before calling forward.

Decode rows run through a DecodeKernel (gpu_worker.decode_kernels: FlashInfer's paged kernel, or SDPA). The SDPA
path folds each query head group into the query axis (decode_attention): a row's q heads that share a KV head are its
queries of that head, so no K/V head is repeated and no GQA support is asked of the kernel. It runs under
FUSED_BACKENDS: a shape or dtype no fused kernel takes raises instead of falling back to SDPA's math backend (which
upcasts to fp32 and materialises the scores: on a GPU, many times the fused kernels' time and memory).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_worker.device_inputs import Send, to_device_together
from gpu_worker.kv_cache import PagedKVCache

ContextKV = tuple[torch.Tensor, torch.Tensor]  # K and V [num_kv_heads, context, head_dim] of a chunk's earlier tokens
# SDPA's backends but math (the order is torch's own priority among those a call may use)
FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def chunk_mask(context: int, length: int, device: torch.device) -> torch.Tensor:
    """[length, context + length] True where query i (position context + i) sees key j (position j <= context + i)."""
    keys = torch.arange(context + length, device=device)  # [context + length]
    queries = context + torch.arange(length, device=device)  # [length]
    return keys[None, :] <= queries[:, None]


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: ContextKV, mask: torch.Tensor
) -> torch.Tensor:
    """A chunk of one request, q [len, num_heads, head_dim] and its own k/v [len, num_kv_heads, head_dim], over the
    request's earlier KV and its own, causally (mask from chunk_mask) -> [len, num_heads, head_dim]."""
    past_k, past_v = past
    keys = torch.cat([past_k.to(k.dtype), k.transpose(0, 1)], dim=1)  # [kv_heads, context + len, head_dim]
    values = torch.cat([past_v.to(v.dtype), v.transpose(0, 1)], dim=1)  # [kv_heads, context + len, head_dim]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, num_heads, len, head_dim]
        keys[None],
        values[None],
        attn_mask=mask,  # [len, context + len]
        enable_gqa=True,
    )  # [1, num_heads, len, head_dim]
    return out[0].transpose(0, 1)  # [len, num_heads, head_dim]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one request over its own tokens: q [len, num_heads, head_dim], k/v [len, num_kv_heads,
    head_dim] -> like q."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, num_heads, len, head_dim]
        k.transpose(0, 1)[None],  # [1, num_kv_heads, len, head_dim]
        v.transpose(0, 1)[None],  # [1, num_kv_heads, len, head_dim]
        is_causal=True,
        enable_gqa=True,
    )  # [1, num_heads, len, head_dim]
    return out[0].transpose(0, 1)  # [len, num_heads, head_dim]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as the additive one SDPA would make of it on every call: 0 or -inf, in dtype."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row: q [rows, num_heads, head_dim] over k/v [rows, num_kv_heads, slots, head_dim] where mask
    [rows, 1, 1, slots] allows (boolean, or additive in q's dtype) -> [rows, num_heads, head_dim]. Query head h reads
    KV head h // group (LLaMA's repeat_kv order), so the group folds into the query axis by a view."""
    rows, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    with sdpa_kernel(FUSED_BACKENDS):
        out = F.scaled_dot_product_attention(
            q.view(rows, kv_heads, num_heads // kv_heads, head_dim), k, v, attn_mask=mask
        )  # [rows, kv_heads, group, head_dim]
    return out.view(rows, num_heads, head_dim)


@dataclass(frozen=True)
class PageRows:
    """The decode rows' pages in FlashInfer's paged-KV form: row r's context is the pages indices[indptr[r] :
    indptr[r + 1]], in order, of which the last holds last_page_lens[r] tokens (1 .. block_size)."""

    indptr: torch.Tensor  # [rows + 1] int32, host
    indices: torch.Tensor  # [sum of pages] int32, on the device
    last_page_lens: torch.Tensor  # [rows] int32, host

    @staticmethod
    def host_lists(tables: Sequence[list[int]], context_lens: Sequence[int], block_size: int
                   ) -> tuple[list[int], list[int], list[int]]:
        """indptr, indices and last page lengths of rows with block tables (at least their pages long) and context
        lengths (>= 1)."""
        indptr, indices, last = [0], [], []
        for table, context in zip(tables, context_lens):
            pages = -(-context // block_size)
            indices.extend(table[:pages])
            indptr.append(len(indices))
            last.append(context - (pages - 1) * block_size)
        return indptr, indices, last


LIVE_PLANS = 2  # decode plans in use at once: one per sub-batch of a step


class DecodePlan(Protocol):
    def run(self, layer_idx: int, q: torch.Tensor) -> torch.Tensor:
        """q [rows, num_heads, head_dim] over the planned rows' context in layer layer_idx -> like q."""


class DecodeKernel(Protocol):
    """Decode attention over the paged pool: one query per row over its cached context (decode_kernels.py has the
    implementations). A plan serves every layer of a step's sub-batch and stays valid until LIVE_PLANS more are
    made."""

    def plan(self, cache: PagedKVCache, metadata: "AttentionMetadata", dtype: torch.dtype) -> DecodePlan:
        """The decode rows of `metadata` over `cache`, for q in dtype."""


@dataclass(frozen=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [num_slots] block id of each written token's KV slot
    slot_offsets: torch.Tensor  # [num_slots] offset inside that block
    prefill_lens: tuple[int, ...]  # tokens of each prefill row, in layout order
    prefill_contexts: tuple[int, ...]  # per prefill row: tokens of the request before its chunk (0: from position 0)
    context_tables: tuple[torch.Tensor, ...]  # per prefill row: [blocks] of its context in this pool ([] elsewhere)
    chunk_masks: dict[int, torch.Tensor]  # by prefill row with context > 0: its chunk_mask
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] padded with block 0
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] True where a context slot is valid
    decode_pages: PageRows  # the same rows' contexts as pages

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def num_decodes(self) -> int:
        return self.decode_block_tables.shape[0]

    @classmethod
    def build(
        cls,
        prefill_lens: list[int],
        slot_blocks: list[int],
        slot_offsets: list[int],
        decode_block_tables: list[list[int]],
        decode_context_lens: list[int],
        block_size: int,
        device: torch.device,
        prefill_contexts: Sequence[int] = (),
        context_block_tables: Sequence[list[int]] = (),
        send: Send | None = None,
    ) -> "AttentionMetadata":
        """Pad the decode rows' block tables and mask the slots past each row's context length; the chunks' masks.
        prefill_contexts () means every prefill row starts at position 0; context_block_tables () means no chunk's
        context is in this pool. The index tensors are made on the host and reach the device through `send` (default:
        device_inputs.to_device_together, one copy); the masks are made on the device from them."""
        contexts = tuple(prefill_contexts) or (0,) * len(prefill_lens)
        context_tables = tuple(context_block_tables) or ([],) * len(prefill_lens)
        max_blocks = max((len(t) for t in decode_block_tables), default=0)
        tables = [t + [0] * (max_blocks - len(t)) for t in decode_block_tables]
        indptr, page_indices, last_page_lens = PageRows.host_lists(decode_block_tables, decode_context_lens, block_size)
        host = [
            torch.tensor(slot_blocks, dtype=torch.long),  # [num_slots]
            torch.tensor(slot_offsets, dtype=torch.long),  # [num_slots]
            torch.tensor(decode_context_lens, dtype=torch.long),  # [num_decodes]
            torch.tensor(tables, dtype=torch.long).reshape(len(tables), max_blocks),  # [num_decodes, max_blocks]
            torch.tensor(page_indices, dtype=torch.int32),  # [sum of pages]
            *(torch.tensor(t, dtype=torch.long) for t in context_tables),  # [blocks] each
        ]
        blocks, offsets, context, decode_tables, pages, *chunk_tables = (
            send(host) if send is not None else to_device_together(host, device))
        slots = torch.arange(max_blocks * block_size, device=device)  # [max_blocks * block_size]
        return cls(
            slot_blocks=blocks,
            slot_offsets=offsets,
            prefill_lens=tuple(prefill_lens),
            prefill_contexts=contexts,
            context_tables=tuple(chunk_tables),
            chunk_masks={row: chunk_mask(p, n, device) for row, (n, p) in enumerate(zip(prefill_lens, contexts)) if p},
            decode_block_tables=decode_tables,
            decode_mask=(slots[None, :] < context[:, None])[:, None, None, :],
            decode_pages=PageRows(torch.tensor(indptr, dtype=torch.int32), pages,
                                  torch.tensor(last_page_lens, dtype=torch.int32)),
        )


class PagedAttention:
    """Attention of one layer for all rows of a step, reading and writing the paged KV pool; the decode rows through
    a DecodeKernel, planned by the step's first layer for every layer."""

    def __init__(self, cache: PagedKVCache, decode: DecodeKernel) -> None:
        self.cache = cache
        self.decode = decode
        self._plans: list[tuple[AttentionMetadata, DecodePlan]] = []  # the last LIVE_PLANS, oldest first

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        loaded: Mapping[int, ContextKV] | None = None,
    ) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim] -> like q. The decode rows'
        k/v must already be in the cache. A chunk's earlier KV is read from this pool through its context table,
        or given in loaded (by prefill row, on q's device) when it lives in another pool."""
        outputs = []
        start = 0
        for row, (length, context) in enumerate(zip(metadata.prefill_lens, metadata.prefill_contexts)):
            rows = slice(start, start + length)
            if context == 0:
                outputs.append(causal_attention(q[rows], k[rows], v[rows]))
            else:
                past = loaded[row] if loaded and row in loaded else self.cache.gather_context(
                    layer_idx, metadata.context_tables[row], context
                )
                outputs.append(chunk_attention(q[rows], k[rows], v[rows], past, metadata.chunk_masks[row]))
            start += length
        if metadata.num_decodes:
            outputs.append(self._plan(metadata, q.dtype).run(layer_idx, q[start:]))  # [rows, num_heads, head_dim]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _plan(self, metadata: AttentionMetadata, dtype: torch.dtype) -> DecodePlan:
        """The sub-batch's decode plan, made by its first layer of the step."""
        for planned, plan in self._plans:
            if planned is metadata:
                return plan
        plan = self.decode.plan(self.cache, metadata, dtype)
        self._plans = [*self._plans[1 - LIVE_PLANS :], (metadata, plan)]
        return plan
