"""The LLaMA-family model description, parsed from a Hugging Face config.json."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; llama3 uses all fields, linear only factor."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim: must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either the legacy (rope_theta, rope_scaling) or the rope_parameters form."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported ({SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    original = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", raw["max_position_embeddings"]
    )
    return theta, RopeScaling(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(original),
    )


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse the dict of a config.json; unsupported features raise ValueError naming them."""
    model_type = raw.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type: {model_type!r} is not supported ({SUPPORTED_MODEL_TYPES})")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias: MLP biases are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: only silu is supported, got {raw['hidden_act']!r}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    theta, scaling = _rope(raw)
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        vocab_size=int(raw["vocab_size"]),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_token_ids(raw.get("eos_token_id")),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read config.json (and the eos ids of generation_config.json, when present) from a model directory."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    generation = model_dir / "generation_config.json"
    if generation.exists():
        extra = _token_ids(json.loads(generation.read_text()).get("eos_token_id"))
        base = _token_ids(raw.get("eos_token_id"))
        raw = {**raw, "eos_token_id": list(dict.fromkeys(base + extra))}
    config = parse_model_config(raw)
    logger.info("model config from %s: %s", model_dir, config)
    return config
