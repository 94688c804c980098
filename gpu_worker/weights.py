"""Loading a Hugging Face LLaMA checkpoint (safetensors, possibly sharded) into plain tensors."""

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gpu_worker.layers import LayerWeights
from gpu_worker.model_config import ModelConfig
from gpu_worker.rope import RotaryEmbedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelWeights:
    embed_tokens: torch.Tensor  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied
    rope: RotaryEmbedding  # every layer's


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return shards


class _Checkpoint:
    """Tensors by name across the shards, read lazily and converted to the target dtype and device."""

    def __init__(self, files: list[Path], stack: ExitStack, dtype: torch.dtype, device: torch.device) -> None:
        self._where: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():
                self._where[name] = handle
        self._dtype = dtype
        self._device = device

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return self._where[name].get_tensor(name).to(device=self._device, dtype=self._dtype)

    def cat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self.get(name) for name in names], dim=0)


def _layer(ckpt: _Checkpoint, config: ModelConfig, i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
    has_qkv_bias = config.attention_bias or ckpt.has(p + "self_attn.q_proj.bias")
    o_bias = p + "self_attn.o_proj.bias"
    return LayerWeights(
        input_norm=ckpt.get(p + "input_layernorm.weight"),
        qkv_proj=ckpt.cat(qkv),
        qkv_bias=ckpt.cat([p + f"self_attn.{x}_proj.bias" for x in "qkv"]) if has_qkv_bias else None,
        o_proj=ckpt.get(p + "self_attn.o_proj.weight"),
        o_bias=ckpt.get(o_bias) if ckpt.has(o_bias) else None,  # LLaMA's attention_bias; Qwen2 has none
        post_attention_norm=ckpt.get(p + "post_attention_layernorm.weight"),
        gate_up_proj=ckpt.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
        down_proj=ckpt.get(p + "mlp.down_proj.weight"),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
    )


def load_weights(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, rope: RotaryEmbedding
) -> ModelWeights:
    """Load all weights of a LLaMA-family checkpoint, fusing QKV and gate/up projections."""
    files = _shard_files(Path(model_dir))
    with ExitStack() as stack:
        ckpt = _Checkpoint(files, stack, dtype, device)
        embed = ckpt.get("model.embed_tokens.weight")
        tied = config.tie_word_embeddings or not ckpt.has("lm_head.weight")
        weights = ModelWeights(
            embed_tokens=embed,
            layers=tuple(_layer(ckpt, config, i) for i in range(config.num_hidden_layers)),
            final_norm=ckpt.get("model.norm.weight"),
            lm_head=embed if tied else ckpt.get("lm_head.weight"),
            rope=rope,
        )
    logger.info(
        "loaded %d layers from %d file(s) in %s (%s, %s)", len(weights.layers), len(files), model_dir, dtype, device
    )
    return weights
