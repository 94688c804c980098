"""What the simulator runs on: a model shape on a hardware setup, its KV pools and its cost model.

Models (Hugging Face configs of meta-llama/Llama-2-7b-hf and meta-llama/Llama-3.1-8B, untied lm head):
    llama2-7b     32 layers, hidden 4096, intermediate 11008, 32 q / 32 kv heads, head_dim 128, vocab 32000, fp16
    llama3.1-8b   32 layers, hidden 4096, intermediate 14336, 32 q / 8 kv heads, head_dim 128, vocab 128256, bf16
Weights and KV cache are 16-bit; a model whose weights do not fit the GPU (LLaMA-3.1-8B, 16.1 GB, on the 16 GB T4)
is refused (UnsupportedSetup), not quantised.

Hardware: a GPU preset in its host with the knobs applied (apex_tools.sim.hardware: each figure and its source).
Half the host memory holds the CPU KV pool; the rest is the OS, the services and the page cache of the weights.

Accelerator KV pool, as vLLM sizes it with gpu_memory_utilization 0.9 (the 10% left covers the CUDA context,
cuBLAS workspace and fragmentation):
    blocks = (GPU memory * 0.9 - weight bytes - activation reserve) // (block_size * KV bytes per token, all layers)
    activation reserve = max_num_batched_tokens * (4 * hidden + 2 * intermediate) * 2 bytes   (the residual stream,
        norm output, QKV and the MLP's gate and up of the largest step, 16-bit) + max_num_seqs * vocab * 4 bytes
        (fp32 logits)
With LLaMA-2-7B (max_num_batched_tokens 4096, max_num_seqs 256) that leaves 1,088 tokens of KV on the T4 and
14,816 on the A10.

"this-machine": the TableCostModel of a profile JSON saved by profiler_service, on the shapes of the profiled model's
config.json; its pools are given (the device's KV budget and the CPU pool), as on the real stack.

The simulator does not model positions, so every setup takes a context of MAX_MODEL_LEN tokens, enough for every
synthetic workload.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from apex_serve.types import WorkerInfo
from apex_tools.sim.hardware import GPUS, Knobs, hardware_spec, host_of
from scheduler_service.cost.analytic import AnalyticCosts
from scheduler_service.cost.model import ComposedCostModel, LayerCosts
from scheduler_service.cost.shape import ModelShape, model_shape_from_config
from scheduler_service.cost.tables import PerformanceTables

BLOCK_SIZE = 16
MAX_MODEL_LEN = 8192
CPU_MAX_ROWS = 256  # CPU decode rows one sub-batch can stage
GPU_MEMORY_UTILIZATION = 0.9
HOST_KV_FRACTION = 0.5  # of the host memory, for the CPU KV pool


class UnsupportedSetup(ValueError):
    """A (hardware, model) pair that cannot run: the weights do not fit the GPU."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    shape: ModelShape
    dtype: str
    eos_token_ids: tuple[int, ...]

    @property
    def weight_bytes(self) -> int:
        """Every decoder layer, the embedding and the untied lm head with its final norm."""
        shape = self.shape
        params = shape.num_layers * shape.layer_params + shape.vocab_size * shape.hidden_size + shape.head_params
        return params * shape.weight_bytes_per_param


MODELS = {
    "llama2-7b": ModelSpec(
        "llama2-7b", ModelShape(num_layers=32, hidden_size=4096, intermediate_size=11008, num_q_heads=32,
                                num_kv_heads=32, head_dim=128, vocab_size=32000), "float16", (2,)),
    "llama3.1-8b": ModelSpec(
        "llama3.1-8b", ModelShape(num_layers=32, hidden_size=4096, intermediate_size=14336, num_q_heads=32,
                                  num_kv_heads=8, head_dim=128, vocab_size=128256), "bfloat16", (128001, 128009)),
}
HARDWARE = (*GPUS, "this-machine")


@dataclass(frozen=True)
class Setup:
    """One model on one machine: what the scheduler is told (worker) and what each iteration costs (costs)."""

    hardware: str
    model: str
    shape: ModelShape
    costs: LayerCosts
    worker: WorkerInfo

    def cost_model(self) -> ComposedCostModel:
        """A fresh cost model of this setup (the scheduler's, or the simulator's ground truth)."""
        return ComposedCostModel(self.costs, self.shape)

    def describe(self) -> str:
        w = self.worker
        return (f"{self.hardware}/{self.model}: {w.num_kv_blocks} accelerator KV blocks "
                f"({w.num_kv_blocks * w.block_size:,} tokens), {w.num_cpu_kv_blocks} CPU KV blocks "
                f"({w.num_cpu_kv_blocks * w.block_size:,} tokens)")


def activation_reserve_bytes(shape: ModelShape, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    per_token = (4 * shape.hidden_size + 2 * shape.intermediate_size) * 2
    return max_num_batched_tokens * per_token + max_num_seqs * shape.vocab_size * 4


def kv_bytes_per_block(shape: ModelShape) -> int:
    return BLOCK_SIZE * shape.kv_bytes_per_token * shape.num_layers


def _worker(name: str, shape: ModelShape, dtype: str, eos: tuple[int, ...], gpu_blocks: int, cpu_blocks: int,
            decode_attention: str) -> WorkerInfo:
    return WorkerInfo(
        model_name=name, num_layers=shape.num_layers, vocab_size=shape.vocab_size, max_model_len=MAX_MODEL_LEN,
        eos_token_ids=eos, block_size=BLOCK_SIZE, num_kv_blocks=gpu_blocks, device="sim", dtype=dtype,
        num_cpu_kv_blocks=cpu_blocks, cpu_kv_dtype=dtype, cpu_max_rows=CPU_MAX_ROWS,
        bytes_per_cpu_row=shape.bytes_per_cpu_row, decode_attention=decode_attention,
    )


def published_setup(hardware: str, model: str, max_num_batched_tokens: int, max_num_seqs: int,
                    knobs: Knobs | None = None) -> Setup:
    """A model on T4 or A10 (in its host, with the knobs; None: the presets) with the roofline cost model;
    UnsupportedSetup if the weights leave no KV room."""
    knobs = knobs or Knobs()
    spec, memory, host = MODELS[model], GPUS[hardware].memory_bytes, host_of(hardware, knobs)
    shape = spec.shape
    usable = int(memory * GPU_MEMORY_UTILIZATION)
    reserve = activation_reserve_bytes(shape, max_num_batched_tokens, max_num_seqs)
    free = usable - spec.weight_bytes - reserve
    gpu_blocks = free // kv_bytes_per_block(shape)
    if gpu_blocks < 1:
        raise UnsupportedSetup(
            f"{model} on {hardware}: {spec.weight_bytes / 1e9:.2f} GB of 16-bit weights and a "
            f"{reserve / 1e9:.2f} GB activation reserve do not fit {usable / 1e9:.2f} GB "
            f"({GPU_MEMORY_UTILIZATION:.0%} of {memory / 1e9:.0f} GB); the simulator does not quantise"
        )
    cpu_blocks = int(host.memory_bytes * HOST_KV_FRACTION) // kv_bytes_per_block(shape)
    worker = _worker(spec.name, shape, spec.dtype, spec.eos_token_ids, gpu_blocks, cpu_blocks, knobs.decode_attention)
    return Setup(hardware, model, shape, AnalyticCosts(hardware_spec(hardware, knobs), shape), worker)


def profiled_setup(profile_path: str, model_config_path: str, gpu_blocks: int, cpu_blocks: int,
                   decode_attention: str = "sdpa") -> Setup:
    """This machine: the profiler's measured tables on the profiled model's shapes, with the given pools and the
    decode kernel the profiled worker ran (hardware.DECODE_ATTENTION)."""
    config = json.loads(Path(model_config_path).read_text())
    shape = model_shape_from_config(config)
    tables = PerformanceTables.from_json(json.loads(Path(profile_path).read_text()))
    if tables.num_layers != shape.num_layers:
        raise ValueError(f"--profile has {tables.num_layers} layers, --model-config {shape.num_layers}: "
                         "profile the model you simulate")
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype = config.get("torch_dtype") or "float16"
    name = Path(model_config_path).parent.name or "profiled"
    worker = _worker(name, shape, dtype, eos_ids, gpu_blocks, cpu_blocks, decode_attention)
    return Setup("this-machine", name, shape, tables, worker)
