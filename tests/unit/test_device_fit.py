"""The dtype and size checks a CUDA device gets before the weights load, on fake device properties: the T4 and A10 of
the NVIDIA data sheets (apex_tools.sim.hardware) with LLaMA-2-7B and LLaMA-3.1-8B."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from apex_tools.sim.hardware import GPUS
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.device_fit import CudaDevice, check_fits, parameter_count, resolve_dtype
from gpu_worker.model_config import parse_model_config

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
LLAMA31_8B = {**LLAMA2_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rope_theta": 500000.0}
T4 = CudaDevice("Tesla T4", (7, 5), GPUS["t4"].memory_bytes)
A10 = CudaDevice("NVIDIA A10", (8, 6), GPUS["a10"].memory_bytes)


def test_auto_dtype_is_float16_on_cuda_and_float32_on_the_cpu_and_the_default() -> None:
    assert resolve_dtype("auto", torch.device("cuda", 0)) == "float16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cuda", 0)) == "bfloat16"
    assert GpuWorkerConfig(model_dir="m").dtype == "auto"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_equals_transformers_llama(tied: bool, bias: bool) -> None:
    raw = {**LLAMA31_8B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": tied, "attention_bias": bias}
    model = LlamaForCausalLM(LlamaConfig(**raw))
    assert parameter_count(parse_model_config(raw)) == sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_published_checkpoints() -> None:
    assert parameter_count(parse_model_config(LLAMA2_7B)) == 6_738_415_616
    assert parameter_count(parse_model_config(LLAMA31_8B)) == 8_030_261_248


def test_bfloat16_is_refused_below_sm80_naming_the_capability() -> None:
    refusal = r"dtype: bfloat16 needs compute capability 8\.0 .* Tesla T4 is 7\.5: use float16"
    with pytest.raises(ValueError, match=refusal):
        check_fits(T4, "bfloat16", parse_model_config(LLAMA2_7B))
    check_fits(A10, "bfloat16", parse_model_config(LLAMA31_8B))


def test_weights_larger_than_the_device_are_refused_naming_both_sizes() -> None:
    with pytest.raises(ValueError, match=r"model: 16\.06 GB of float16 weights do not fit Tesla T4's 16\.00 GB"):
        check_fits(T4, "float16", parse_model_config(LLAMA31_8B))
    with pytest.raises(ValueError, match=r"model: 26\.95 GB of float32 weights do not fit NVIDIA A10's 24\.00 GB"):
        check_fits(A10, "float32", parse_model_config(LLAMA2_7B))
    check_fits(T4, "float16", parse_model_config(LLAMA2_7B))
    check_fits(A10, "float16", parse_model_config(LLAMA31_8B))
