"""The decoder layer as plain functions, split around attention so attention can run elsewhere."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_worker.rope import Angles, rotate


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: fused QKV and gate/up projections, plus the shapes pre_attention needs."""

    input_norm: torch.Tensor  # [hidden]
    qkv_proj: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size]
    o_proj: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up_proj: torch.Tensor  # [2 * intermediate, hidden]
    down_proj: torch.Tensor  # [hidden, intermediate]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm: statistics in fp32, the gain applied in the weight dtype after the cast
    back. torch's rms_norm (no gain) is one fused kernel on CUDA, and on the CPU the same ops as LlamaRMSNorm's."""
    normed = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)  # [num_tokens, hidden] fp32
    return weight * normed.to(x.dtype)  # [num_tokens, hidden]


def pre_attention(
    layer: LayerWeights, hidden: torch.Tensor, angles: Angles
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, QKV projection and RoPE of hidden [num_tokens, hidden] at its tokens' angles (q and k heads rotated in
    one pass over the projection's q and k columns)."""
    normed = rms_norm(hidden, layer.input_norm, layer.rms_norm_eps)  # [num_tokens, hidden]
    qkv = F.linear(normed, layer.qkv_proj, layer.qkv_bias)  # [num_tokens, q_size + 2 * kv_size]
    heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    qk_size = (heads + kv_heads) * head_dim
    qk = rotate(qkv[:, :qk_size].view(-1, heads + kv_heads, head_dim), angles)  # [num_tokens, heads + kv_heads, dim]
    v = qkv[:, qk_size:].view(-1, kv_heads, head_dim)  # [num_tokens, num_kv_heads, head_dim]
    return qk[:, :heads], qk[:, heads:], v


def mlp(layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU: down(silu(gate(x)) * up(x)) of x [num_tokens, hidden]."""
    gate, up = F.linear(x, layer.gate_up_proj).chunk(2, dim=-1)  # 2 x [num_tokens, intermediate]
    return F.linear(F.silu(gate) * up, layer.down_proj)  # [num_tokens, hidden]


def post_attention(layer: LayerWeights, hidden_residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """O-proj of attn_out [num_tokens, num_heads, head_dim], residual, norm, MLP, residual."""
    attn = F.linear(attn_out.flatten(1), layer.o_proj, layer.o_bias)  # [num_tokens, hidden]
    hidden = hidden_residual + attn  # [num_tokens, hidden]
    normed = rms_norm(hidden, layer.post_attention_norm, layer.rms_norm_eps)  # [num_tokens, hidden]
    return hidden + mlp(layer, normed)  # [num_tokens, hidden]
