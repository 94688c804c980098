"""Rotary position embedding, rotate-half convention, with the frequencies transformers computes. A step gathers its
tokens' angles once (RotaryEmbedding.angles) for every layer, and each layer rotates its q and k heads in one pass."""

import math
from dataclasses import dataclass

import torch

from gpu_worker.model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """fp32 inverse frequencies, scaled as transformers' default, linear and llama3 rope types do."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim  # [head_dim // 2]
    inv_freq = 1.0 / (config.rope_theta**exponents)  # [head_dim // 2]
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [head_dim // 2]
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / scaling.factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


@dataclass(frozen=True)
class Angles:
    """cos and sin [num_tokens, 1, head_dim] of a step's token positions, in the model dtype."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __getitem__(self, rows: slice) -> "Angles":
        return Angles(self.cos[rows], self.sin[rows])


def rotate(x: torch.Tensor, angles: Angles) -> torch.Tensor:
    """x [num_tokens, heads, head_dim] rotated by its tokens' angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [num_tokens, heads, head_dim]
    return x * angles.cos + rotated * angles.sin


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_len), computed in fp32 and stored in the model dtype."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        inv_freq = inverse_frequencies(config).to(device)  # [head_dim // 2]
        positions = torch.arange(max_len, device=device, dtype=torch.float)  # [max_len]
        freqs = positions[:, None] * inv_freq[None, :]  # [max_len, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
        self.cos = emb.cos().to(dtype)  # [max_len, head_dim]
        self.sin = emb.sin().to(dtype)  # [max_len, head_dim]
        self.max_len = max_len

    def angles(self, positions: torch.Tensor) -> Angles:
        """The angles of positions [num_tokens]."""
        return Angles(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
