"""Hybrid execution benchmark, in one run:

1. the per-layer transport: doorbell round trip through a real cpu_attention_worker against a gRPC
   bidirectional-stream round trip between two processes (p50/p99);
2. decode tokens/s of GPU_ONLY, ASYNC_OVERLAP and ASYM_PIPELINE on a random LLaMA (hidden 1024, 8 layers, GQA)
   at the same device KV budget (it holds the GPU rows only; the hybrid modes add CPU rows), with the device
   (this process, torch on one thread) on the first core and the cpu_attention_worker on the second; and the
   fraction of CPU attention time hidden under device work, 1 - wait / CPU busy time, summed over the
   measured steps.

ASYNC_OVERLAP runs the GPU and CPU rows as one batch; ASYM_PIPELINE puts the GPU rows in sub-batch 0 and the
CPU rows in sub-batch 1, so each sub-batch's CPU attention runs under the other's device work.
"""

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from apex_serve import rpc
from apex_serve.logs import configure_logging
from apex_serve.types import ExecutionMode, Placement
from apex_tools.bench.common import one_core, write_result
from apex_tools.bench.scripted_scheduler import ScriptedScheduler
from apex_tools.bench.transport import measure
from apex_tools.default_model import BENCH_SPEC, write_random_llama
from apex_tools.processes import ServiceGroup, pinned, split_cores
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Setup:
    gpu_rows: int
    cpu_rows: int
    prompt_len: int
    decode_steps: int
    warmup_steps: int = 2
    transport_iterations: int = 20_000


SETUPS = {
    "full": Setup(gpu_rows=8, cpu_rows=8, prompt_len=256, decode_steps=32),
    "quick": Setup(gpu_rows=4, cpu_rows=4, prompt_len=64, decode_steps=8, transport_iterations=5_000),
    "tiny": Setup(gpu_rows=2, cpu_rows=2, prompt_len=16, decode_steps=2, warmup_steps=1, transport_iterations=200),
}
MODES = {  # name: (mode, CPU rows used, sub-batch of the CPU rows)
    "gpu_only": (ExecutionMode.GPU_ONLY, False, 0),
    "async_overlap": (ExecutionMode.ASYNC_OVERLAP, True, 0),
    "asym_pipeline": (ExecutionMode.ASYM_PIPELINE, True, 1),
}


def run_mode(model_dir: Path, cpu_address: str, setup: Setup, name: str) -> dict:
    mode, with_cpu, cpu_sub_batch = MODES[name]
    blocks_per_row = -(-(setup.prompt_len + setup.warmup_steps + setup.decode_steps + 1) // BLOCK_SIZE)
    config = GpuWorkerConfig(
        model_dir=str(model_dir), device="cpu", num_threads=1, block_size=BLOCK_SIZE,
        num_kv_blocks=setup.gpu_rows * blocks_per_row, cpu_worker_address=cpu_address,
        cpu_num_kv_blocks=setup.cpu_rows * blocks_per_row, cpu_max_rows=max(setup.cpu_rows, 1),
    )
    runner = ModelRunner(config)
    scheduler = ScriptedScheduler(runner, seed=1)
    try:
        prompt = [256] + [(7 * i) % 256 for i in range(setup.prompt_len - 1)]
        for i in range(setup.gpu_rows):
            scheduler.add(f"g{i}", prompt, Placement.GPU, 0)
        for i in range(setup.cpu_rows if with_cpu else 0):
            scheduler.add(f"c{i}", prompt, Placement.CPU, cpu_sub_batch)
        for _ in range(1 + setup.warmup_steps):  # the prefill, then warm-up decode steps
            scheduler.step(mode)
        start = time.perf_counter()
        outputs = [scheduler.step(mode) for _ in range(setup.decode_steps)]
        elapsed = time.perf_counter() - start
    finally:
        runner.close()
    rows = len(scheduler.requests)
    cpu_ns = sum(o.timings.cpu_attention_ns for o in outputs)
    wait_ns = sum(o.timings.wait_ns for o in outputs)
    return {
        "mode": name,
        "gpu_rows": setup.gpu_rows,
        "cpu_rows": rows - setup.gpu_rows,
        "tokens_per_s": rows * setup.decode_steps / elapsed,
        "step_ms": elapsed / setup.decode_steps * 1e3,
        "cpu_attention_ms_per_step": cpu_ns / setup.decode_steps / 1e6,
        "wait_ms_per_step": wait_ns / setup.decode_steps / 1e6,
        "device_linear_ms_per_step": sum(o.timings.device_linear_ns for o in outputs) / setup.decode_steps / 1e6,
        "hidden_fraction": None if cpu_ns == 0 else max(0.0, 1.0 - wait_ns / cpu_ns),
    }


def report(result: dict) -> str:
    transport = result["transport"]
    lines = [
        f"transport ({transport['iterations']} round trips): doorbell p50 {transport['doorbell']['p50_us']:.1f} us "
        f"p99 {transport['doorbell']['p99_us']:.1f} us; gRPC stream p50 {transport['grpc_stream']['p50_us']:.1f} us "
        f"p99 {transport['grpc_stream']['p99_us']:.1f} us; gRPC / doorbell at p50 = {transport['p50_ratio']:.0f}x",
        f"{'mode':<14}{'gpu':>5}{'cpu':>5}{'tok/s':>9}{'vs gpu':>8}{'step ms':>9}{'cpu att':>9}{'wait':>8}"
        f"{'hidden':>8}",
    ]
    base = result["modes"][0]["tokens_per_s"]
    for row in result["modes"]:
        hidden = "-" if row["hidden_fraction"] is None else f"{row['hidden_fraction']:.2f}"
        lines.append(
            f"{row['mode']:<14}{row['gpu_rows']:>5}{row['cpu_rows']:>5}{row['tokens_per_s']:>9.1f}"
            f"{row['tokens_per_s'] / base:>8.2f}{row['step_ms']:>9.1f}{row['cpu_attention_ms_per_step']:>9.2f}"
            f"{row['wait_ms_per_step']:>8.2f}{hidden:>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-hybrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small setup (under a minute)")
    size.add_argument("--tiny", action="store_true", help="a smoke test (seconds)")
    parser.add_argument("--out", default="bench_results/hybrid.json")
    args = parser.parse_args(argv)
    configure_logging("bench-hybrid")
    setup = SETUPS["quick" if args.quick else "tiny" if args.tiny else "full"]
    device_cpus, worker_cpus = split_cores(device=1, host=1)
    with (pinned(device_cpus), tempfile.TemporaryDirectory(prefix="apex-bench-hybrid-") as tmp,
          ServiceGroup(stop_timeout_s=30.0) as services):
        torch.set_num_threads(1)
        run_dir = Path(tmp)
        model_dir = write_random_llama(run_dir / BENCH_SPEC.name, BENCH_SPEC)
        address = rpc.unix_address(run_dir, "cpu_attention_worker")
        services.start("cpu_attention_worker", address, ["--address", address, "--num-threads", "1"], worker_cpus,
                       timeout_s=60.0)
        result = {
            "setup": setup.__dict__,
            "device_cpu": one_core(device_cpus),
            "cpu_worker_cpu": one_core(worker_cpus),
            "transport": measure(address, run_dir, setup.transport_iterations, worker_cpus),
            "modes": [run_mode(model_dir, address, setup, name) for name in MODES],
        }
    logger.info("hybrid execution on %s\n%s", BENCH_SPEC.name, report(result))
    write_result(args.out, result)
    return 0
