"""Hybrid execution benchmark, in one run:

1. the per-layer transport: doorbell round trip through a real cpu_attention_worker against a gRPC
   bidirectional-stream round trip between two processes (p50/p99);
2. decode tokens/s of GPU_ONLY, and of ASYNC_OVERLAP and ASYM_PIPELINE each in the fused and the split overlap
   layout, on a random LLaMA (hidden 1024, 8 layers, GQA) at the same device KV budget (it holds the GPU rows
   only; the hybrid modes add CPU rows), with the device (this process: torch on one thread of the first core, or
   a CUDA device with --device cuda) and the cpu_attention_worker on the second core; and the fraction of CPU
   attention time hidden under device work, 1 - wait / CPU busy time, summed over the measured steps.
   The modes take turns on one ModelRunner, round after round (each over its own requests, which stay between its
   turns); each reports its median round, and its tokens/s over GPU_ONLY's in the same round (the median ratio).

The `/graphs` contenders replay each layer's linear work from decode graphs (gpu_worker.decode_graphs: CUDA graphs
on CUDA; on the CPU the same static buffers run eagerly, which measures their copies' cost and no gain).

ASYNC_OVERLAP runs the GPU and CPU rows as one batch; ASYM_PIPELINE puts the GPU rows in sub-batch 0 and the
CPU rows in sub-batch 1, so each sub-batch's CPU attention runs under the other's device work. The fused layout
projects QKV once over all rows of a layer, the split layout the CPU rows' first and the others' in the window (a
second pass over the QKV weights).
"""

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from apex_serve import rpc
from apex_serve.logs import configure_logging
from apex_serve.types import ExecutionMode, OverlapLayout, Placement, StepOutput
from apex_tools.bench.common import one_core, write_result
from apex_tools.bench.scripted_scheduler import ScriptedScheduler
from apex_tools.bench.transport import measure
from apex_tools.default_model import BENCH_SPEC, write_random_llama
from apex_tools.processes import ServiceGroup, pinned, split_cores
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.decode_graphs import DecodeGraphs, capture_for
from gpu_worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Setup:
    gpu_rows: int
    cpu_rows: int
    prompt_len: int
    decode_steps: int  # measured per mode and round
    rounds: int  # the modes take turns, round after round; each reports its median round
    warmup_steps: int = 1  # per mode and round, before its measured steps
    transport_iterations: int = 20_000

    @property
    def max_tokens(self) -> int:
        """A request's tokens at the end of the run."""
        return self.prompt_len + self.rounds * (self.warmup_steps + self.decode_steps) + 1


SETUPS = {
    "full": Setup(gpu_rows=8, cpu_rows=8, prompt_len=256, decode_steps=8, rounds=5),
    "quick": Setup(gpu_rows=4, cpu_rows=4, prompt_len=64, decode_steps=4, rounds=3, transport_iterations=5_000),
    "tiny": Setup(gpu_rows=2, cpu_rows=2, prompt_len=16, decode_steps=2, rounds=1, transport_iterations=200),
    "cuda": Setup(gpu_rows=32, cpu_rows=16, prompt_len=512, decode_steps=64, rounds=10),  # about three minutes
}
FUSED, SPLIT = OverlapLayout.FUSED, OverlapLayout.SPLIT
MODES = {  # name: (mode, layout, CPU rows used, sub-batch of the CPU rows, decode graphs replayed)
    "gpu_only": (ExecutionMode.GPU_ONLY, FUSED, False, 0, False),
    "async_overlap/fused": (ExecutionMode.ASYNC_OVERLAP, FUSED, True, 0, False),
    "async_overlap/split": (ExecutionMode.ASYNC_OVERLAP, SPLIT, True, 0, False),
    "asym_pipeline/fused": (ExecutionMode.ASYM_PIPELINE, FUSED, True, 1, False),
    "asym_pipeline/split": (ExecutionMode.ASYM_PIPELINE, SPLIT, True, 1, False),
    "gpu_only/graphs": (ExecutionMode.GPU_ONLY, FUSED, False, 0, True),
    "async_overlap/fused/graphs": (ExecutionMode.ASYNC_OVERLAP, FUSED, True, 0, True),
}


def make_runner(model_dir: Path, cpu_address: str, setup: Setup, device: str) -> ModelRunner:
    """One runner for every mode: its pools hold every mode's rows at once (each mode's requests stay between its
    turns); a step runs one mode's rows, so the device pool a step uses is still that of its GPU rows."""
    blocks_per_row = -(-setup.max_tokens // BLOCK_SIZE)
    return ModelRunner(GpuWorkerConfig(
        model_dir=str(model_dir), device=device, num_threads=1, block_size=BLOCK_SIZE,
        num_kv_blocks=len(MODES) * setup.gpu_rows * blocks_per_row, cpu_worker_address=cpu_address,
        cpu_num_kv_blocks=len(MODES) * setup.cpu_rows * blocks_per_row, cpu_max_rows=max(setup.cpu_rows, 1),
    ))


class Contender:
    """One mode and layout over its own requests and its share of the runner's pools."""

    def __init__(self, runner: ModelRunner, setup: Setup, name: str, index: int, graphs: DecodeGraphs) -> None:
        self.name = name
        self.mode, self.layout, with_cpu, cpu_sub_batch, graphed = MODES[name]
        self.runner, self.graphs = runner, graphs if graphed else None
        self.setup = setup
        self.scheduler = ScriptedScheduler(runner, seed=index)
        for pool in self.scheduler.free.values():  # every contender its own blocks
            pool[:] = [block for block in pool if block % len(MODES) == index]
        prompt = [256] + [(7 * i) % 256 for i in range(setup.prompt_len - 1)]
        for i in range(setup.gpu_rows):
            self.scheduler.add(f"{name}/g{i}", prompt, Placement.GPU, 0)
        for i in range(setup.cpu_rows if with_cpu else 0):
            self.scheduler.add(f"{name}/c{i}", prompt, Placement.CPU, cpu_sub_batch)
        self.rounds: list[tuple[float, list[StepOutput]]] = []  # (seconds, outputs) of each measured round

    def step(self) -> StepOutput:
        self.runner.forward.graphs = self.graphs  # the runner's decode graphs are this contender's to use or not
        return self.scheduler.run(replace(self.scheduler.plan(self.mode), layout=self.layout))

    def run_round(self) -> None:
        for _ in range(self.setup.warmup_steps):
            self.step()
        start = time.perf_counter()
        outputs = [self.step() for _ in range(self.setup.decode_steps)]
        self.rounds.append((time.perf_counter() - start, outputs))

    def result(self, anchor: "Contender") -> dict:
        """The median round's figures, and tokens/s over the anchor's in the same round (median over rounds)."""
        rows = len(self.scheduler.requests)
        steps = self.setup.decode_steps
        rates = [rows * steps / elapsed for elapsed, _ in self.rounds]
        anchor_rows = len(anchor.scheduler.requests)
        ratios = [rate / (anchor_rows * steps / elapsed) for rate, (elapsed, _) in zip(rates, anchor.rounds)]
        elapsed, outputs = sorted(self.rounds, key=lambda r: r[0])[len(self.rounds) // 2]
        cpu_ns = sum(o.timings.cpu_attention_ns for o in outputs)
        wait_ns = sum(o.timings.wait_ns for o in outputs)
        return {
            "mode": self.name,
            "layout": self.layout.value,
            "graphs": self.graphs is not None,
            "gpu_rows": self.setup.gpu_rows,
            "cpu_rows": rows - self.setup.gpu_rows,
            "tokens_per_s": rows * steps / elapsed,
            "tokens_per_s_rounds": rates,
            "vs_gpu_only": statistics.median(ratios),
            "step_ms": elapsed / steps * 1e3,
            "cpu_attention_ms_per_step": cpu_ns / steps / 1e6,
            "wait_ms_per_step": wait_ns / steps / 1e6,
            "device_linear_ms_per_step": sum(o.timings.device_linear_ns for o in outputs) / steps / 1e6,
            "hidden_fraction": None if cpu_ns == 0 else max(0.0, 1.0 - wait_ns / cpu_ns),
        }


def run_modes(runner: ModelRunner, setup: Setup) -> list[dict]:
    """Every mode's prefill, then setup.rounds rounds in which each mode in turn runs its measured steps."""
    graphs = DecodeGraphs(runner.weights, setup.gpu_rows + setup.cpu_rows, capture_for(runner.device))
    contenders = [Contender(runner, setup, name, index, graphs) for index, name in enumerate(MODES)]
    for contender in contenders:
        contender.step()  # the prefill
    for _ in range(setup.rounds):
        for contender in contenders:
            contender.run_round()
    return [contender.result(contenders[0]) for contender in contenders]


def report(result: dict) -> str:
    transport = result["transport"]
    lines = [
        (f"transport ({transport['iterations']} round trips): doorbell p50 {transport['doorbell']['p50_us']:.1f} us "
        f"p99 {transport['doorbell']['p99_us']:.1f} us; gRPC stream p50 {transport['grpc_stream']['p50_us']:.1f} us "
        f"p99 {transport['grpc_stream']['p99_us']:.1f} us; gRPC / doorbell at p50 = {transport['p50_ratio']:.0f}x"),
        (f"{'mode':<28}{'gpu':>5}{'cpu':>5}{'tok/s':>9}{'vs gpu':>8}{'step ms':>9}{'linear':>8}{'cpu att':>9}"
        f"{'wait':>8}{'hidden':>8}"),
    ]
    for row in result["modes"]:
        hidden = "-" if row["hidden_fraction"] is None else f"{row['hidden_fraction']:.2f}"
        lines.append(
            f"{row['mode']:<28}{row['gpu_rows']:>5}{row['cpu_rows']:>5}{row['tokens_per_s']:>9.1f}"
            f"{row['vs_gpu_only']:>8.2f}{row['step_ms']:>9.1f}{row['device_linear_ms_per_step']:>8.1f}"
            f"{row['cpu_attention_ms_per_step']:>9.2f}{row['wait_ms_per_step']:>8.2f}{hidden:>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-hybrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a small setup (under a minute on the CPU)")
    size.add_argument("--tiny", action="store_true", help="a smoke test (seconds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="the gpu_worker's device: the first core (one torch thread), or the CUDA device (then, "
                        "without --quick or --tiny, a setup of 32 + 16 rows that takes about three minutes)")
    parser.add_argument("--out", default="bench_results/hybrid.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    configure_logging("bench-hybrid")
    setup = SETUPS["quick" if args.quick else "tiny" if args.tiny else "cuda" if args.device == "cuda" else "full"]
    device_cpus, worker_cpus = split_cores(device=1, host=1)
    with (pinned(device_cpus), tempfile.TemporaryDirectory(prefix="apex-bench-hybrid-") as tmp,
          ServiceGroup(stop_timeout_s=30.0) as services):
        torch.set_num_threads(1)
        run_dir = Path(tmp)
        model_dir = write_random_llama(run_dir / BENCH_SPEC.name, BENCH_SPEC)
        address = rpc.unix_address(run_dir, "cpu_attention_worker")
        services.start("cpu_attention_worker", address, ["--address", address, "--num-threads", "1"], worker_cpus,
                       timeout_s=60.0)
        transport = measure(address, run_dir, setup.transport_iterations, worker_cpus)
        runner = make_runner(model_dir, address, setup, args.device)
        try:
            modes = run_modes(runner, setup)
        finally:
            runner.close()
        result = {
            "setup": setup.__dict__,
            "device": str(runner.device),
            "device_cpu": one_core(device_cpus),
            "cpu_worker_cpu": one_core(worker_cpus),
            "transport": transport,
            "modes": modes,
        }
    logger.info("hybrid execution on %s, device %s\n%s", BENCH_SPEC.name, result["device"], report(result))
    write_result(args.out, result)
    return 0
