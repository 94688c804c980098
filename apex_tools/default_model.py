"""The default model: a small random-weight LLaMA with a byte-level tokenizer, written locally (no download).

Weights are spread (linear std 1/sqrt(fan_in), norm gains near 1, embeddings std 1 when untied) so greedy
continuations vary, unlike transformers' std-0.02 initialisation (DESIGN §7). A tied head gets std-0.02
embeddings: larger ones make the model echo its input token. Does not import transformers.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

BOS_TOKEN_ID = 256
EOS_TOKEN_ID = 257
# A LLaMA-3-like chat template in plain bytes (the tokenizer has no special turn tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TIED_EMBEDDING_STD = 0.02


@dataclass(frozen=True)
class RandomLlamaSpec:
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 258
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    name: str = "apex-tiny-llama"

    def __post_init__(self) -> None:
        if self.vocab_size < 258:
            raise ValueError(f"vocab_size: must be >= 258 (256 bytes + <s> + </s>), got {self.vocab_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads: {self.num_heads} must divide hidden_size and be divisible by num_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


DEFAULT_SPEC = RandomLlamaSpec()
BENCH_SPEC = RandomLlamaSpec(
    hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4, name="apex-bench-llama"
)


def _config(spec: RandomLlamaSpec) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
    }


def _weights(spec: RandomLlamaSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) / in_features**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(spec.hidden_size, generator=generator)

    hidden, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    embed_std = TIED_EMBEDDING_STD if spec.tie_word_embeddings else 1.0
    tensors = {"model.embed_tokens.weight": torch.randn(spec.vocab_size, hidden, generator=generator) * embed_std}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm()
        tensors[p + "self_attn.q_proj.weight"] = linear(hidden, hidden)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv, hidden)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv, hidden)
        tensors[p + "self_attn.o_proj.weight"] = linear(hidden, hidden)
        tensors[p + "post_attention_layernorm.weight"] = norm()
        tensors[p + "mlp.gate_proj.weight"] = linear(spec.intermediate_size, hidden)
        tensors[p + "mlp.up_proj.weight"] = linear(spec.intermediate_size, hidden)
        tensors[p + "mlp.down_proj.weight"] = linear(hidden, spec.intermediate_size)
    tensors["model.norm.weight"] = norm()
    if not spec.tie_word_embeddings:
        tensors["lm_head.weight"] = linear(spec.vocab_size, hidden)
    return tensors


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_byte_tokenizer() -> Tokenizer:
    """Token id i < 256 is byte i; <s> = 256, </s> = 257; encoding prepends <s>."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    return tokenizer


def _write_tokenizer(out_dir: Path, spec: RandomLlamaSpec) -> None:
    tokenizer = build_byte_tokenizer()
    if tokenizer.token_to_id("<s>") != BOS_TOKEN_ID or tokenizer.token_to_id("</s>") != EOS_TOKEN_ID:
        raise RuntimeError("byte tokenizer special token ids are not 256 and 257")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_random_llama(out_dir: str | Path, spec: RandomLlamaSpec = DEFAULT_SPEC, seed: int = 0) -> Path:
    """Write config, safetensors weights and the byte tokenizer of spec to out_dir; same bytes for a seed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(_config(spec), indent=2) + "\n")
    save_file(_weights(spec, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(out_dir, spec)
    logger.info("wrote random %s (seed %d) to %s", spec.name, seed, out_dir)
    return out_dir
