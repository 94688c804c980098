"""The simulator's hardware presets: each figure equals the source its docstring names, and the knobs set what they
say."""

import statistics

import pytest

from apex_tools.sim.engine import Simulation
from apex_tools.sim.hardware import (
    CPU_KERNEL_EFFICIENCY,
    GPUS,
    HOSTS,
    PER_CORE_READ,
    Knobs,
    hardware_spec,
    with_value,
)
from apex_tools.sim.setups import published_setup
from apex_tools.sim.workloads import WorkloadSpec, generate
from scheduler_service.config import SchedulerConfig

GIB = 1 << 30


def test_gpu_presets_are_the_data_sheets_figures_and_their_pcie_generation() -> None:
    t4, a10 = GPUS["t4"], GPUS["a10"]
    assert (t4.memory_bytes, t4.hbm_bytes_per_s, t4.fp16_flops) == (16e9, 320e9, 65e12)
    assert (a10.memory_bytes, a10.hbm_bytes_per_s, a10.fp16_flops) == (24e9, 600e9, 125e12)
    assert t4.pcie_bytes_per_s == pytest.approx(15.75e9, rel=1e-3)  # PCIe 3.0 x16, per direction
    assert a10.pcie_bytes_per_s == pytest.approx(31.5e9, rel=1e-3)  # PCIe 4.0 x16
    assert (t4.default_host, a10.default_host) == ("g4dn.4xlarge", "g5.4xlarge")


def test_host_presets_are_the_instances_cores_memory_and_ddr_channels() -> None:
    g4, g5, g5_16 = HOSTS["g4dn.4xlarge"], HOSTS["g5.4xlarge"], HOSTS["g5.16xlarge"]
    assert (g4.cores, g4.memory_bytes) == (8, 64 * GIB)
    assert (g5.cores, g5.memory_bytes) == (8, 64 * GIB)
    assert (g5_16.cores, g5_16.memory_bytes) == (32, 256 * GIB)
    assert g4.socket_read_peak == pytest.approx(140.78e9, rel=1e-4)  # 6 x DDR4-2933
    assert g5.socket_read_peak == g5_16.socket_read_peak == pytest.approx(204.8e9)  # 8 x DDR4-3200


def test_a_hosts_read_bandwidth_is_its_cores_at_the_measured_slope_capped_by_its_channels() -> None:
    per_core = PER_CORE_READ
    assert per_core == pytest.approx(130e9 / 15)
    assert HOSTS["g4dn.4xlarge"].read_bytes_per_s == pytest.approx(8 * 130e9 / 15)
    assert HOSTS["g5.16xlarge"].read_bytes_per_s == pytest.approx(204.8e9)  # 32 cores would pull 277 GB/s


def test_the_cpu_kernel_efficiency_is_the_median_of_the_bench_kernel_ratios_it_cites() -> None:
    assert statistics.median([0.76, 0.81, 0.77, 0.79]) == pytest.approx(CPU_KERNEL_EFFICIENCY)


def test_the_default_spec_is_the_presets_without_correction() -> None:
    spec = hardware_spec("t4")
    assert (spec.hbm_bytes_per_s, spec.flops, spec.pcie_bytes_per_s) == (320e9, 65e12, GPUS["t4"].pcie_bytes_per_s)
    assert spec.host_dram_bytes_per_s == HOSTS["g4dn.4xlarge"].read_bytes_per_s
    assert (spec.cpu_attention_efficiency, spec.launch_overhead_ns, spec.pcie_latency_ns) == (0.78, 10_000.0, 0.0)


def test_knobs_override_each_figure() -> None:
    knobs = Knobs(host="g5.16xlarge", host_bw_gbs=20, cpu_kernel_efficiency=0.5, gpu_bw_efficiency=0.8,
                  gpu_flops_efficiency=0.6, pcie_gbs=10, pcie_latency_us=5, launch_us=3)
    spec = hardware_spec("a10", knobs)
    assert spec.name == "a10/g5.16xlarge"
    assert (spec.host_dram_bytes_per_s, spec.cpu_attention_efficiency) == (20e9, 0.5)
    assert (spec.hbm_bytes_per_s, spec.flops) == (pytest.approx(480e9), pytest.approx(75e12))
    assert (spec.pcie_bytes_per_s, spec.pcie_latency_ns, spec.launch_overhead_ns) == (10e9, 5_000.0, 3_000.0)
    assert hardware_spec("a10", with_value(Knobs(), "host-bw", 120)).host_dram_bytes_per_s == 120e9


def test_a_larger_host_gives_a_larger_cpu_kv_pool() -> None:
    small = published_setup("a10", "llama2-7b", 4096, 256).worker.num_cpu_kv_blocks
    large = published_setup("a10", "llama2-7b", 4096, 256, Knobs(host="g5.16xlarge")).worker.num_cpu_kv_blocks
    assert large == 4 * small


@pytest.mark.parametrize(("field", "value"), [("host", "g9.huge"), ("host_bw_gbs", 0.0), ("pcie_gbs", -1.0),
                                              ("cpu_kernel_efficiency", 1.2), ("gpu_bw_efficiency", 0.0),
                                              ("pcie_latency_us", -1.0), ("launch_us", -0.5),
                                              ("decode_attention", "paged")])
def test_knobs_out_of_range_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Knobs(**{field: value})


def test_flashinfer_reads_each_rows_own_context_so_gpu_only_steps_faster_than_under_sdpas_padding() -> None:
    """Chat's accelerator rows differ in context: SDPA's gathered batch reads every row at the longest one, FlashInfer's
    paged kernel each row's own pages, so the same requests finish sooner under it."""
    requests = generate(WorkloadSpec("chat", 60, 0.0, 0))
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096)
    runs = {}
    for kernel in ("sdpa", "flashinfer"):
        setup = published_setup("a10", "llama2-7b", 4096, 64, Knobs(decode_attention=kernel))
        assert setup.worker.paged_decode is (kernel == "flashinfer")
        runs[kernel] = Simulation(setup, requests, config, "chat", "gpu-only").run()
    assert runs["sdpa"].finished == runs["flashinfer"].finished == 60
    assert runs["flashinfer"].duration_s < 0.95 * runs["sdpa"].duration_s
