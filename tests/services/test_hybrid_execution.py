"""Hybrid execution: a real cpu_attention_worker process, its shared-memory data plane and the three modes give the
tokens of the GPU-only run and of transformers (fp32 greedy), with swaps; per-step timings; faults."""

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from apex_serve.errors import FailedPrecondition, InvalidArgument, Unavailable
from apex_serve.types import ExecutionMode, NewRequestData, Placement, StepPlan
from apex_tools.bench.scripted_scheduler import GREEDY, ScriptedScheduler
from apex_tools.processes import ServiceGroup
from conftest import start_cpu_worker
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner

DECODE_STEPS = 210
PROMPT_LENS = (3, 9, 17, 30, 5, 24, 12, 40)
LATE = {4: 5, 5: 5, 6: 40, 7: 90}  # prompt index -> the step it arrives at (prefill mixed with decode)
MODELS = ("mha_model_dir", "gqa_llama3_model_dir")


def make_runner(model_dir: Path, cpu_address: str, **overrides: object) -> ModelRunner:
    settings: dict = dict(
        model_dir=str(model_dir), device="cpu", block_size=4, num_kv_blocks=640, num_threads=1,
        cpu_worker_address=cpu_address, cpu_num_kv_blocks=640, cpu_max_rows=8,
    )
    return ModelRunner(GpuWorkerConfig(**(settings | overrides)))


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in PROMPT_LENS]


Scenario = Callable[[ScriptedScheduler, int], None]


def run(runner: ModelRunner, mode: ExecutionMode, placement: Callable[[int], Placement],
        scenario: Scenario | None = None, sub_batch: Callable[[int], int] = lambda i: 0) -> dict[str, list[int]]:
    """DECODE_STEPS steps; prompt i arrives at step LATE.get(i, 0) with placement(i) and sub_batch(i)."""
    scheduler = ScriptedScheduler(runner)
    try:
        for step in range(DECODE_STEPS):
            for i, prompt in enumerate(prompts()):
                if LATE.get(i, 0) == step:
                    scheduler.add(f"r{i}", prompt, placement(i), sub_batch(i))
            if scenario is None:
                scheduler.step(mode)
            else:
                scenario(scheduler, step)
        return scheduler.tokens()
    finally:
        runner.close()


def hf_tokens(model_dir: Path, steps: dict[str, int]) -> dict[str, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = {}
    for i, prompt in enumerate(prompts()):
        input_ids = torch.tensor([prompt])
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=steps[f"r{i}"], pad_token_id=0)
        out[f"r{i}"] = generated[0, len(prompt):].tolist()
    return out


def swapping(scheduler: ScriptedScheduler, step: int) -> None:
    """ASYNC_OVERLAP; every 20 steps the CPU-resident requests swap in and the GPU ones (running) swap out."""
    running = [rid for rid, r in scheduler.requests.items() if r.outputs]
    if step % 20 == 10 and running:
        out = tuple(rid for rid in running if scheduler.requests[rid].placement is Placement.GPU)
        back = tuple(rid for rid in running if scheduler.requests[rid].placement is Placement.CPU)
        scheduler.step(ExecutionMode.ASYNC_OVERLAP, swap_out=out, swap_in=back)
    else:
        scheduler.step(ExecutionMode.ASYNC_OVERLAP)


@pytest.fixture(scope="module", params=MODELS)
def reference(request: pytest.FixtureRequest, cpu_worker: str) -> tuple[Path, dict[str, list[int]]]:
    model_dir = request.getfixturevalue(request.param)
    gpu_only = run(make_runner(model_dir, cpu_worker), ExecutionMode.GPU_ONLY, lambda i: Placement.GPU)
    assert len({tuple(t[:20]) for t in gpu_only.values()}) == len(gpu_only), "the model's continuations do not vary"
    hf = hf_tokens(model_dir, {rid: len(tokens) for rid, tokens in gpu_only.items()})
    assert gpu_only == hf, "the GPU-only run diverges from transformers"
    return model_dir, gpu_only


def alternate(i: int) -> Placement:
    return [Placement.CPU, Placement.GPU][i % 2]


def alternate_pairs(i: int) -> Placement:
    return [Placement.CPU, Placement.GPU][i // 2 % 2]


CASES = {  # name: (mode, placement of prompt i, scenario, sub-batch of prompt i)
    "async_overlap_alternate_rows": (ExecutionMode.ASYNC_OVERLAP, alternate, None, lambda i: 0),
    "async_overlap_all_cpu": (ExecutionMode.ASYNC_OVERLAP, lambda i: Placement.CPU, None, lambda i: 0),
    "asym_pipeline_mixed_sub_batches": (ExecutionMode.ASYM_PIPELINE, alternate_pairs, None, lambda i: i % 2),
    "async_overlap_with_swaps": (ExecutionMode.ASYNC_OVERLAP, alternate, swapping, lambda i: 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_mode_decodes_the_tokens_of_gpu_only_and_transformers(
    case: str, reference: tuple[Path, dict[str, list[int]]], cpu_worker: str
) -> None:
    model_dir, expected = reference
    mode, placement, scenario, sub_batch = CASES[case]
    tokens = run(make_runner(model_dir, cpu_worker), mode, placement, scenario, sub_batch)
    assert min(len(t) for t in tokens.values()) >= DECODE_STEPS - max(LATE.values()) - 1
    for rid in expected:
        assert tokens[rid] == expected[rid], f"{case}: {rid} diverges from the GPU-only run (and transformers)"


def test_step_reports_cpu_attention_staging_and_wait_times(mha_model_dir: Path, cpu_worker: str) -> None:
    runner = make_runner(mha_model_dir, cpu_worker)
    scheduler = ScriptedScheduler(runner)
    try:
        for i, prompt in enumerate(prompts()[:4]):
            scheduler.add(f"r{i}", prompt, [Placement.CPU, Placement.GPU][i % 2])
        scheduler.step(ExecutionMode.ASYNC_OVERLAP)
        timings = scheduler.step(ExecutionMode.ASYNC_OVERLAP).timings
    finally:
        runner.close()
    assert timings.cpu_attention_ns > 0 and timings.staging_ns > 0
    assert timings.device_linear_ns > 0 and timings.device_attention_ns > 0
    assert timings.device_linear_ns + timings.device_attention_ns + timings.wait_ns <= timings.forward_ns


def test_cpu_decode_rows_are_rejected_in_a_gpu_only_step(mha_model_dir: Path, cpu_worker: str) -> None:
    runner = make_runner(mha_model_dir, cpu_worker)
    scheduler = ScriptedScheduler(runner)
    try:
        scheduler.add("r0", prompts()[0], Placement.CPU)
        scheduler.step(ExecutionMode.ASYNC_OVERLAP)
        with pytest.raises(InvalidArgument, match="GPU_ONLY"):
            scheduler.step(ExecutionMode.GPU_ONLY)
    finally:
        runner.close()


def test_cpu_placement_without_a_cpu_worker_is_a_failed_precondition(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir, "", cpu_num_kv_blocks=0)
    assert runner.info.num_cpu_kv_blocks == 0
    request = NewRequestData("r0", (256, 1, 2), GREEDY, (0,), 0, Placement.CPU)
    with pytest.raises(FailedPrecondition, match="cpu_worker_address"):
        runner.execute(StepPlan(0, (request,), mode=ExecutionMode.ASYNC_OVERLAP))


def shm_segments(pid: int) -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"apex-serve.{pid}.")]


def test_a_killed_cpu_worker_fails_the_step_within_the_timeout_and_leaves_no_segment_after_restart(
    mha_model_dir: Path, tmp_path: Path
) -> None:
    address = f"unix://{tmp_path}/cpu.sock"
    with ServiceGroup(stop_timeout_s=30.0) as services:
        worker = start_cpu_worker(services, address)
        runner = make_runner(mha_model_dir, address, cpu_wait_timeout_s=5.0)
        scheduler = ScriptedScheduler(runner)
        try:
            scheduler.add("r0", prompts()[0], Placement.CPU)
            scheduler.step(ExecutionMode.ASYNC_OVERLAP)
            assert shm_segments(worker.pid), "the cpu_attention_worker made no shared-memory segment"
            worker.process.kill()
            worker.process.wait()
            with pytest.raises(Unavailable, match="cpu_attention_worker"):
                scheduler.step(ExecutionMode.ASYNC_OVERLAP)
        finally:
            runner.close()
        restarted = start_cpu_worker(services, address)
        try:
            assert shm_segments(worker.pid) == [], "stale segments of the killed worker were not removed at start"
        finally:
            services.stop(restarted)
        assert shm_segments(restarted.pid) == [], "segments left behind after a clean stop"


@pytest.mark.gpu
def test_cuda_device_async_overlap_decodes_the_cuda_gpu_only_tokens(mha_model_dir: Path, cpu_worker: str) -> None:
    """On CUDA the CPU rows' q/k/v go through pinned shared memory on a side stream (CudaHostTransfer)."""
    gpu_only = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.GPU_ONLY,
                   lambda i: Placement.GPU)
    hybrid = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.ASYNC_OVERLAP, alternate)
    assert hybrid == gpu_only
