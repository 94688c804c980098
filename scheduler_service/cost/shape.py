"""What the cost model is asked about: the model's shape (parameter counts, bytes a CPU row stages) and the shape
of one iteration (per sub-batch: prefill requests and decode rows on each side)."""

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from apex_serve.types import ExecutionMode, OverlapLayout

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of the model: parameter counts and the bytes a CPU row stages."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weight_bytes_per_param: int = 2
    kv_bytes_per_element: int = 2  # the CPU KV cache's storage dtype
    staged_qo_bytes_per_element: int = 4  # q and o cross to and from the CPU in fp32 (gpu_worker.cpu_bridge)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_q_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "weight_bytes_per_param", "kv_bytes_per_element", "staged_qo_bytes_per_element"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: must divide num_q_heads={self.num_q_heads}, got {self.num_kv_heads}")

    @cached_property
    def qkv_params(self) -> int:
        return self.hidden_size * (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim

    @cached_property
    def layer_params(self) -> int:
        """QKV, O, gate/up/down and the two norms of one decoder layer."""
        o_proj = self.num_q_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.qkv_params + o_proj + mlp + 2 * self.hidden_size

    @cached_property
    def head_params(self) -> int:
        """Final norm and lm head: the linear work outside the layers."""
        return self.vocab_size * self.hidden_size + self.hidden_size

    @cached_property
    def qkv_fraction(self) -> float:
        return self.qkv_params / self.layer_params

    @cached_property
    def layers_linear_share(self) -> float:
        """Fraction of the step's linear weights that are in the layers (the rest: final norm and lm head)."""
        layers = self.num_layers * self.layer_params
        return layers / (layers + self.head_params)

    @cached_property
    def bytes_per_cpu_row(self) -> int:
        """Bytes staged per CPU decode row per layer: q out and o back, k and v out (the t_xfer x axis)."""
        qo = 2 * self.staged_qo_bytes_per_element * self.num_q_heads * self.head_dim
        kv = 2 * self.kv_bytes_per_element * self.num_kv_heads * self.head_dim
        return qo + kv

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_bytes_per_element * self.num_kv_heads * self.head_dim


def model_shape_from_config(config: dict[str, Any], kv_bytes_per_element: int | None = None) -> ModelShape:
    """ModelShape of a Hugging Face LLaMA-family config.json; the KV element size defaults to the weights' dtype."""
    dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"torch_dtype: must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    heads = config["num_attention_heads"]
    return ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_q_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        weight_bytes_per_param=_DTYPE_BYTES[dtype],
        kv_bytes_per_element=kv_bytes_per_element or _DTYPE_BYTES[dtype],
    )


def _rows_error(side: str, rows: int, kv_tokens: int) -> ValueError:
    return ValueError(f"{side}_kv_tokens: need {side}_rows >= 0 and {side}_rows <= {side}_kv_tokens (0 without rows), "
                      f"got {rows} rows and {kv_tokens} tokens")


@dataclass(frozen=True)
class SubBatchShape:
    """What one sub-batch runs: prefill requests (on the accelerator; a whole prompt or a chunk of one) and decode rows
    on each side."""

    prefill_lens: tuple[int, ...] = ()  # tokens each prefill request computes in this step
    gpu_rows: int = 0
    gpu_kv_tokens: int = 0  # KV tokens summed over the GPU rows, the current token included
    cpu_rows: int = 0
    cpu_kv_tokens: int = 0  # KV tokens summed over the CPU rows, the current token included
    prefill_contexts: tuple[int, ...] = ()  # per prefill request: tokens computed before its chunk; (): all 0
    prefill_loaded_tokens: int = 0  # context tokens of CPU-placed chunks, brought from the CPU pool

    def __post_init__(self) -> None:
        lens, contexts, loaded = self.prefill_lens, self.prefill_contexts, self.prefill_loaded_tokens
        if lens and min(lens) < 1:
            raise ValueError(f"prefill_lens: must all be >= 1, got {lens}")
        if contexts and (len(contexts) != len(lens) or min(contexts) < 0):
            raise ValueError(f"prefill_contexts: one value >= 0 per prefill request, got {contexts}")
        if loaded and not 0 <= loaded <= sum(contexts):  # 0 always fits: the contexts are >= 0
            raise ValueError(f"prefill_loaded_tokens: must be in [0, the contexts' sum], got {loaded}")
        gpu_rows, gpu_kv, cpu_rows, cpu_kv = self.gpu_rows, self.gpu_kv_tokens, self.cpu_rows, self.cpu_kv_tokens
        if gpu_rows < 0 or gpu_kv < gpu_rows or (gpu_rows == 0 and gpu_kv):
            raise _rows_error("gpu", gpu_rows, gpu_kv)
        if cpu_rows < 0 or cpu_kv < cpu_rows or (cpu_rows == 0 and cpu_kv):
            raise _rows_error("cpu", cpu_rows, cpu_kv)
        if not (lens or gpu_rows or cpu_rows):
            raise ValueError("sub-batch: must hold at least one request")

    @property
    def num_requests(self) -> int:
        return len(self.prefill_lens) + self.gpu_rows + self.cpu_rows

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_lens)

    @property
    def prefills(self) -> zip:
        """(tokens, context) of each prefill request."""
        return zip(self.prefill_lens, self.prefill_contexts or (0,) * len(self.prefill_lens))

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.gpu_rows + self.cpu_rows


@dataclass(frozen=True)
class IterationShape:
    mode: ExecutionMode
    sub_batches: tuple[SubBatchShape, ...]
    layout: OverlapLayout = OverlapLayout.FUSED  # of the sub-batches with CPU rows

    def __post_init__(self) -> None:
        most = 2 if self.mode is ExecutionMode.ASYM_PIPELINE else 1
        if not 1 <= len(self.sub_batches) <= most:
            raise ValueError(f"sub_batches: {self.mode.value} takes 1 to {most}, got {len(self.sub_batches)}")
        if self.mode is ExecutionMode.GPU_ONLY and self.num_cpu_rows:
            raise ValueError(f"sub_batches: gpu_only runs no CPU rows, got {self.num_cpu_rows}")

    @property
    def num_requests(self) -> int:
        n = 0  # a loop: over one or two sub-batches it costs half of sum() over a generator, and a decision asks often
        for sb in self.sub_batches:
            n += sb.num_requests
        return n

    @property
    def num_tokens(self) -> int:
        return sum(sb.num_tokens for sb in self.sub_batches)

    @property
    def num_cpu_rows(self) -> int:
        n = 0
        for sb in self.sub_batches:
            n += sb.cpu_rows
        return n

    @property
    def run_layout(self) -> OverlapLayout:
        """The layout the iteration runs: the one it names where it has CPU rows, else FUSED (both are one then)."""
        return self.layout if self.num_cpu_rows else OverlapLayout.FUSED
