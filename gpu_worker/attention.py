"""Attention over a ragged batch: prefill rows attend causally to their own tokens, decode rows read the paged cache.

Tokens are laid out prefill rows first (each request's tokens contiguous), then one token per decode row. The caller
writes the new k/v into whichever pool each row lives in before calling forward.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker.kv_cache import PagedKVCache


@dataclass(frozen=True)
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [num_slots] block id of each written token's KV slot
    slot_offsets: torch.Tensor  # [num_slots] offset inside that block
    prefill_lens: tuple[int, ...]  # tokens of each prefill row, in layout order
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] padded with block 0
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size] True where a context slot is valid

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
    ) -> "AttentionMetadata":
        """Pad the decode rows' block tables and mask the slots past each row's context length."""
        max_blocks = max((len(t) for t in decode_block_tables), default=0)
        tables = [t + [0] * (max_blocks - len(t)) for t in decode_block_tables]
        context = torch.tensor(decode_context_lens, dtype=torch.long, device=device)  # [num_decodes]
        slots = torch.arange(max_blocks * block_size, device=device)  # [max_blocks * block_size]
        return cls(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            prefill_lens=tuple(prefill_lens),
            decode_block_tables=torch.tensor(tables, dtype=torch.long, device=device).reshape(len(tables), max_blocks),
            decode_mask=(slots[None, :] < context[:, None])[:, None, None, :],
        )


class PagedAttention:
    """Attention of one layer for all rows of a step, reading and writing the paged KV pool."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache

    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim] -> like q. The decode rows'
        k/v must already be in the cache."""
        outputs = []
        start = 0
        for length in metadata.prefill_lens:
            rows = slice(start, start + length)
            outputs.append(self._prefill(q[rows], k[rows], v[rows]))
            start += length
        if metadata.num_decodes:
            outputs.append(self._decode(layer_idx, q[start:], metadata))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one request over its own tokens."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, num_heads, len, head_dim]
            k.transpose(0, 1)[None],  # [1, num_kv_heads, len, head_dim]
            v.transpose(0, 1)[None],  # [1, num_kv_heads, len, head_dim]
            is_causal=True,
            enable_gqa=True,
        )  # [1, num_heads, len, head_dim]
        return out[0].transpose(0, 1)  # [len, num_heads, head_dim]

    def _decode(self, layer_idx: int, q: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """One query per row over its cached context, all rows at once (padded and masked)."""
        k, v = self.cache.gather(layer_idx, metadata.decode_block_tables)  # [rows, kv_heads, slots, head_dim]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [rows, num_heads, 1, head_dim]
            k,
            v,
            attn_mask=metadata.decode_mask,  # [rows, 1, 1, slots]
            enable_gqa=True,
        )  # [rows, num_heads, 1, head_dim]
        return out[:, :, 0, :]  # [rows, num_heads, head_dim]
