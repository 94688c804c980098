"""The device KV pool sized from the device's memory, as vLLM's gpu_memory_utilization does: after the weights load, one
worst-case forward (a step at the token budget through every layer, and the LM head over the most rows a step
samples) measures the activations' peak; the pool gets what is left of utilization x the device's memory once the
weights, that peak and the memory other than torch's (the CUDA context, other processes) are counted."""

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from gpu_worker.attention import causal_attention
from gpu_worker.layers import post_attention, pre_attention, rms_norm
from gpu_worker.weights import ModelWeights

logger = logging.getLogger(__name__)


class DeviceMemory(Protocol):
    """What the sizing reads of a device's memory, in bytes."""

    def total(self) -> int: ...

    def allocated(self) -> int:
        """By torch's allocator now."""
        ...

    def peak(self) -> int:
        """By torch's allocator at most since reset_peak()."""
        ...

    def reset_peak(self) -> None: ...

    def used_elsewhere(self) -> int:
        """In use on the device but not by torch's allocator in this process."""
        ...


class CudaMemory:
    """A CUDA device's memory as torch.cuda reports it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def used_elsewhere(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return max(total - free - torch.cuda.memory_reserved(self.device), 0)


def worst_case_forward(weights: ModelWeights, tokens: int, rows: int, max_model_len: int, eps: float,
                       device: torch.device) -> None:
    """A prefill of `tokens` tokens (requests of at most max_model_len) through every layer, then the final norm and the
    LM head in fp32 over `rows` of them: the activations one step at the token budget can hold at once."""
    with torch.inference_mode():
        ids = torch.zeros(tokens, dtype=torch.long, device=device)  # [tokens]
        hidden = torch.nn.functional.embedding(ids, weights.embed_tokens)  # [tokens, hidden]
        lengths = [min(max_model_len, tokens - start) for start in range(0, tokens, max_model_len)]
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # [tokens]
        angles = weights.rope.angles(positions)
        for layer in weights.layers:
            q, k, v = pre_attention(layer, hidden, angles)
            attn = torch.cat([causal_attention(*qkv) for qkv in zip(q.split(lengths), k.split(lengths),
                                                                      v.split(lengths))])  # [tokens, heads, dim]
            hidden = post_attention(layer, hidden, attn)
        normed = rms_norm(hidden[-rows:], weights.final_norm, eps)  # [rows, hidden]
        torch.nn.functional.linear(normed, weights.lm_head).float()  # [rows, vocab]


def kv_pool_blocks(memory: DeviceMemory, utilization: float, bytes_per_block: int,
                   profile: Callable[[], None]) -> int:
    """Blocks of the device KV pool: utilization x total, less what is allocated now (the weights, and the decode
    kernel's workspace where it has one), the peak a call of `profile` adds and the memory used elsewhere; ValueError
    naming gpu_memory_utilization where no block is left."""
    weights = memory.allocated()
    memory.reset_peak()
    profile()
    activations = max(memory.peak() - weights, 0)
    elsewhere = memory.used_elsewhere()
    total = memory.total()
    budget = int(total * utilization) - weights - activations - elsewhere
    blocks = budget // bytes_per_block
    gib = 2**30
    summary = (f"{utilization:.2f} x {total / gib:.2f} GiB, less {weights / gib:.2f} GiB of weights, "
               f"{activations / gib:.2f} GiB of activations and {elsewhere / gib:.2f} GiB used elsewhere")
    if blocks < 1:
        raise ValueError(f"gpu_memory_utilization: {summary} leaves no KV block of {bytes_per_block} bytes")
    logger.info("device KV pool: %d blocks (%.2f GiB): %s", blocks, blocks * bytes_per_block / gib, summary)
    return blocks
