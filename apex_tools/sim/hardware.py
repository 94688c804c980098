"""The hardware the simulator prices iterations on: a GPU, the host it sits in, and the knobs that turn their figures
into the roofline of scheduler_service.cost.analytic. Every preset figure names its source; docs/paper-reproduction.md
lists them with the assumptions that have none.

GPUs (NVIDIA data sheets; the host link is the PCI-SIG rate of the board's interface, per direction):
    t4    16 GB GDDR6, 320 GB/s, 65 TFLOPS fp16 tensor (NVIDIA T4 data sheet); PCIe 3.0 x16: 8 GT/s x 16 lanes x
          128/130 encoding / 8 = 15.75 GB/s
    a10   24 GB GDDR6, 600 GB/s, 125 TFLOPS fp16 tensor, dense (NVIDIA A10 data sheet); PCIe 4.0 x16: 31.5 GB/s.
          AWS's g5 carries the A10G, whose memory system is the A10's (24 GB, 600 GB/s)
Hosts (the AWS instances the paper's GPUs come in; cores and memory from AWS's g4 and g5 pages and NEO's README, which
runs its T4 results on a g4dn.4xlarge, "8 cores of Xeon P-8259CL, 64 GB", and its A10 host sweep on g5.nxlarge, "2n
cores of EPYC 7R32, 16n GB"):
    g4dn.4xlarge   8 cores Xeon Platinum 8259CL (Cascade Lake), 64 GiB; its socket: 6 channels of DDR4-2933,
                   6 x 2933 MT/s x 8 B = 140.8 GB/s
    g5.4xlarge     8 cores EPYC 7R32 (Zen 2), 64 GiB; its socket: 8 channels of DDR4-3200, 8 x 3200 x 8 = 204.8 GB/s
    g5.16xlarge    32 cores EPYC 7R32, 256 GiB; the same socket
A host's read bandwidth is what its cores can pull, capped by its socket's channels: min(cores x PER_CORE_READ, the
channels' peak). PER_CORE_READ is the slope of the one public multi-thread read-bandwidth curve of an AWS-class Xeon at
hand (D. Lemire, "Estimating your memory bandwidth", lemire.me, 2024-01-13: a two-socket Ice Lake server reads 15 GB/s
on one thread and 130 GB/s at about 15 threads): 130 / 15 = 8.67 GB/s per core. A VM's share of a socket it does not
own is not modelled; --host-bw sets the figure outright and --sweep host-bw=... shows what it moves.

Knobs (Knobs, each a flag of apex-serve simulate):
    cpu_kernel_efficiency  the share of the host's read bandwidth our CPU attention kernel reaches: 0.78, the median of
                           `apex-serve bench-kernel -- --quick` on this project's 2-core machine (2026-12-05, the
                           2-thread rows, bf16 and fp32, batch 1 and 8: 0.76, 0.81, 0.77, 0.79; the full grid measured
                           0.77-0.89 before)
    gpu_bw_efficiency, gpu_flops_efficiency   1.0: the data sheets' peaks (no measured figure of these boards at hand)
    pcie_latency_us        0: a copy costs its bytes over the link's rate (no source for a per-copy latency)
    launch_us              10 us per layer subtask (a few kernel launches); an assumption without a source
    decode_attention       the GPU worker's decode kernel (gpu_worker.decode_kernels), which sets the KV tokens the
                           accelerator's attention reads: sdpa, the kernel of the default install (flashinfer-python
                           is optional), pads the rows to the longest context; flashinfer reads each row's own
                           pages, as vLLM's paged attention does
"""

import dataclasses
from dataclasses import dataclass

from scheduler_service.cost.analytic import HardwareSpec

GB = 10**9
GIB = 1 << 30
PER_CORE_READ = 130e9 / 15  # bytes/s one core reads: see the module docstring
CPU_KERNEL_EFFICIENCY = 0.78  # bench-kernel's kernel / read-anchor ratio: see the module docstring


def pcie_bytes_per_s(gigatransfers: float, lanes: int = 16) -> float:
    """A PCIe link's rate per direction: GT/s x lanes x 128b/130b encoding (PCIe 3.0 and later) / 8 bits."""
    return gigatransfers * 1e9 * lanes * 128 / 130 / 8


def dram_peak_bytes_per_s(channels: int, megatransfers: int) -> float:
    """The peak of a socket's DDR channels: channels x MT/s x 8 bytes a transfer."""
    return channels * megatransfers * 1e6 * 8


@dataclass(frozen=True)
class GpuPreset:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    fp16_flops: float
    pcie_bytes_per_s: float
    default_host: str


@dataclass(frozen=True)
class HostPreset:
    instance: str
    cores: int  # physical (vCPUs / 2)
    memory_bytes: int
    socket_read_peak: float  # bytes/s of the socket's DDR channels

    @property
    def read_bytes_per_s(self) -> float:
        return min(self.cores * PER_CORE_READ, self.socket_read_peak)


GPUS = {
    "t4": GpuPreset("t4", 16 * GB, 320e9, 65e12, pcie_bytes_per_s(8), "g4dn.4xlarge"),
    "a10": GpuPreset("a10", 24 * GB, 600e9, 125e12, pcie_bytes_per_s(16), "g5.4xlarge"),
}
HOSTS = {
    "g4dn.4xlarge": HostPreset("g4dn.4xlarge", 8, 64 * GIB, dram_peak_bytes_per_s(6, 2933)),
    "g5.4xlarge": HostPreset("g5.4xlarge", 8, 64 * GIB, dram_peak_bytes_per_s(8, 3200)),
    "g5.16xlarge": HostPreset("g5.16xlarge", 32, 256 * GIB, dram_peak_bytes_per_s(8, 3200)),
}


DECODE_ATTENTION = ("sdpa", "flashinfer")  # the GPU worker's decode kernels (its --decode-attention, less auto)


@dataclass(frozen=True)
class Knobs:
    """What the flags change of a preset; None: the preset's figure."""

    host: str | None = None  # an instance of HOSTS; None: the GPU's default host
    host_bw_gbs: float | None = None  # the host's read bandwidth, GB/s
    cpu_kernel_efficiency: float = CPU_KERNEL_EFFICIENCY
    gpu_bw_efficiency: float = 1.0
    gpu_flops_efficiency: float = 1.0
    pcie_gbs: float | None = None  # per direction, GB/s
    pcie_latency_us: float = 0.0
    launch_us: float = 10.0
    decode_attention: str = "sdpa"  # one of DECODE_ATTENTION

    def __post_init__(self) -> None:
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention: must be one of {', '.join(DECODE_ATTENTION)}, "
                             f"got {self.decode_attention!r}")
        if self.host is not None and self.host not in HOSTS:
            raise ValueError(f"host: must be one of {', '.join(HOSTS)}, got {self.host!r}")
        for name in ("host_bw_gbs", "pcie_gbs"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        for name in ("cpu_kernel_efficiency", "gpu_bw_efficiency", "gpu_flops_efficiency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        for name in ("pcie_latency_us", "launch_us"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


SWEEPABLE = {  # --sweep name: the Knobs field it sets
    "host-bw": "host_bw_gbs",
    "cpu-efficiency": "cpu_kernel_efficiency",
    "gpu-bw-efficiency": "gpu_bw_efficiency",
    "pcie-bw": "pcie_gbs",
    "launch-us": "launch_us",
}


def with_value(knobs: Knobs, sweep: str, value: float) -> Knobs:
    """knobs with the swept figure (a SWEEPABLE name) set to value."""
    return dataclasses.replace(knobs, **{SWEEPABLE[sweep]: value})


def host_of(gpu: str, knobs: Knobs) -> HostPreset:
    return HOSTS[knobs.host or GPUS[gpu].default_host]


def hardware_spec(gpu: str, knobs: Knobs | None = None) -> HardwareSpec:
    """The roofline of a GPU preset in its host (knobs.host, else the GPU's default), the knobs applied (None: the
    presets as they are)."""
    knobs = knobs or Knobs()
    preset, host = GPUS[gpu], host_of(gpu, knobs)
    return HardwareSpec(
        name=f"{preset.name}/{host.instance}",
        hbm_bytes_per_s=preset.hbm_bytes_per_s * knobs.gpu_bw_efficiency,
        flops=preset.fp16_flops * knobs.gpu_flops_efficiency,
        pcie_bytes_per_s=preset.pcie_bytes_per_s if knobs.pcie_gbs is None else knobs.pcie_gbs * GB,
        host_dram_bytes_per_s=host.read_bytes_per_s if knobs.host_bw_gbs is None else knobs.host_bw_gbs * GB,
        cpu_attention_efficiency=knobs.cpu_kernel_efficiency,
        launch_overhead_ns=knobs.launch_us * 1e3,
        pcie_latency_ns=knobs.pcie_latency_us * 1e3,
    )


T4 = hardware_spec("t4")
A10 = hardware_spec("a10")
