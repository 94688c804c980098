"""What the model's dtype and size ask of the device, checked before any weight loads: --dtype auto resolves to float16
on CUDA (every CUDA GPU computes it natively) and float32 on the CPU; bfloat16 needs compute capability 8.0 (sm80:
A100, A10, L4 and newer; a T4 is 7.5); the weights must fit the device's memory with room left for activations and
KV. Each refusal names the field and the limit."""

from dataclasses import dataclass

import torch

from gpu_worker.model_config import ModelConfig

BF16_CAPABILITY = (8, 0)
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class CudaDevice:
    """The properties of a CUDA device the checks read."""

    name: str
    capability: tuple[int, int]
    total_bytes: int

    @classmethod
    def of(cls, device: torch.device) -> "CudaDevice":
        props = torch.cuda.get_device_properties(device)
        return cls(props.name, (props.major, props.minor), props.total_memory)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The model dtype of --dtype `name` on `device`: auto is float16 on CUDA, float32 elsewhere."""
    if name != "auto":
        return name
    return "float16" if device.type == "cuda" else "float32"


def parameter_count(config: ModelConfig) -> int:
    """The parameters of a LLaMA-family checkpoint: embedding, decoder layers, final norm and (untied) lm head."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    q, kv = heads * config.head_dim, kv_heads * config.head_dim
    attention = hidden * (q + 2 * kv) + q * hidden + (q + 2 * kv + hidden if config.attention_bias else 0)
    layer = attention + 3 * hidden * config.intermediate_size + 2 * hidden
    head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return config.vocab_size * hidden + config.num_hidden_layers * layer + hidden + head


def check_fits(device: CudaDevice, dtype: str, config: ModelConfig) -> None:
    """Refuse (ValueError naming the limit) a dtype the device cannot compute natively, or weights that leave it no
    memory for activations and the KV pool."""
    major, minor = device.capability
    if dtype == "bfloat16" and device.capability < BF16_CAPABILITY:
        raise ValueError(
            f"dtype: bfloat16 needs compute capability {BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]} or newer; "
            f"{device.name} is {major}.{minor}: use float16"
        )
    weights = parameter_count(config) * ELEMENT_BYTES[dtype]
    if weights >= device.total_bytes:
        raise ValueError(
            f"model: {weights / 1e9:.2f} GB of {dtype} weights do not fit {device.name}'s "
            f"{device.total_bytes / 1e9:.2f} GB with room for activations and the KV pool"
        )
