"""The cost model of published hardware numbers (DESIGN §6), for the simulator: roofline per-layer costs of a model
on a GPU and its host, composed and corrected exactly as the measured tables are (cost_model.ComposedCostModel). The
presets and their sources are the simulator's (apex_tools.sim.hardware)."""

from dataclasses import dataclass

from scheduler_service.cost.model import ComposedCostModel
from scheduler_service.cost.shape import ModelShape

_NS_PER_S = 1e9


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    hbm_bytes_per_s: float  # GPU memory bandwidth
    flops: float  # fp16 dense, per second
    pcie_bytes_per_s: float  # the host path the CPU rows' q/k/v/o take
    host_dram_bytes_per_s: float
    cpu_attention_efficiency: float  # fraction of host DRAM bandwidth the CPU attention kernel reaches
    launch_overhead_ns: float  # per layer subtask on the GPU (kernel launches); also one doorbell round trip
    pcie_latency_ns: float = 0.0  # per copy over the host link, beside its bytes over pcie_bytes_per_s

    def __post_init__(self) -> None:
        for name in ("hbm_bytes_per_s", "flops", "pcie_bytes_per_s", "host_dram_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.cpu_attention_efficiency <= 1.0:
            raise ValueError(f"cpu_attention_efficiency: must be in (0, 1], got {self.cpu_attention_efficiency}")
        for name in ("launch_overhead_ns", "pcie_latency_ns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class AnalyticCosts:
    """Roofline per-layer costs (ns): the slower of streaming the bytes and doing the flops, plus launch overhead."""

    hardware: HardwareSpec
    model: ModelShape

    def t_lin(self, tokens: float) -> float:
        params = self.model.layer_params
        weights = params * self.model.weight_bytes_per_param / self.hardware.hbm_bytes_per_s
        compute = 2.0 * params * tokens / self.hardware.flops
        return max(weights, compute) * _NS_PER_S + self.hardware.launch_overhead_ns

    def t_pref(self, tokens: float, context: float) -> float:
        """A chunk's attention: QK^T and PV of its tokens over the context before it and, causally, over itself
        (2 flops per multiply-add, two products); the slower of that and reading the context's KV."""
        model = self.model
        flops = 4.0 * tokens * (context + tokens / 2.0) * model.num_q_heads * model.head_dim
        kv_bytes = context * model.kv_bytes_per_token
        seconds = max(flops / self.hardware.flops, kv_bytes / self.hardware.hbm_bytes_per_s)
        return seconds * _NS_PER_S + self.hardware.launch_overhead_ns

    def t_gatt(self, rows: float, kv_tokens: float) -> float:
        kv_bytes = kv_tokens * self.model.kv_bytes_per_token
        return kv_bytes / self.hardware.hbm_bytes_per_s * _NS_PER_S + self.hardware.launch_overhead_ns

    def t_catt(self, rows: float, kv_tokens: float) -> float:
        kv_bytes = kv_tokens * self.model.kv_bytes_per_token
        bandwidth = self.hardware.host_dram_bytes_per_s * self.hardware.cpu_attention_efficiency
        return kv_bytes / bandwidth * _NS_PER_S

    def t_xfer(self, nbytes: float) -> float:
        """One copy over the host link: its latency and its bytes at the link's rate (nothing without bytes)."""
        if nbytes <= 0:
            return 0.0
        return nbytes / self.hardware.pcie_bytes_per_s * _NS_PER_S + self.hardware.pcie_latency_ns

    def t_sync(self, x: float) -> float:
        return self.hardware.launch_overhead_ns

    def t_step(self, requests: float) -> float:
        """Final norm and lm head over the requests' last tokens (embedding and sampling are small beside it)."""
        params = self.model.head_params
        weights = params * self.model.weight_bytes_per_param / self.hardware.hbm_bytes_per_s
        compute = 2.0 * params * requests / self.hardware.flops
        return max(weights, compute) * _NS_PER_S + self.hardware.launch_overhead_ns


class AnalyticCostModel(ComposedCostModel):
    def __init__(self, hardware: HardwareSpec, shape: ModelShape, alpha: float = 0.1) -> None:
        super().__init__(AnalyticCosts(hardware, shape), shape, alpha)
        self.hardware = hardware
