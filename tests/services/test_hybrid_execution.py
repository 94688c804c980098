"""Hybrid execution: a real cpu_attention_worker process, its shared-memory data plane and the three modes, in both
overlap layouts, give the tokens of the GPU-only run and of transformers (fp32 greedy), with swaps; each layout's
passes over the weights; per-step timings; faults."""

import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from queued_transfer import QueuedTransfer
from transformers import AutoModelForCausalLM

from apex_serve.errors import FailedPrecondition, InvalidArgument, Unavailable
from apex_serve.types import ExecutionMode, NewRequestData, OverlapLayout, Placement, StepOutput, StepPlan
from apex_tools.bench.scripted_scheduler import GREEDY, ScriptedScheduler
from apex_tools.processes import ServiceGroup
from conftest import start_cpu_worker
from gpu_worker import cpu_pool, forward, host_transfer
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.host_transfer import HostRegistry
from gpu_worker.model_runner import ModelRunner

DECODE_STEPS = 210
PROMPT_LENS = (3, 9, 17, 30, 5, 24, 12, 40)
LATE = {4: 5, 5: 5, 6: 40, 7: 90}  # prompt index -> the step it arrives at (prefill mixed with decode)
MODELS = ("mha_model_dir", "gqa_llama3_model_dir")


def make_runner(model_dir: Path, cpu_address: str, **overrides: object) -> ModelRunner:
    settings: dict = {
        "model_dir": str(model_dir), "device": "cpu", "dtype": "float32",  # exact against fp32 references
        "block_size": 4, "num_kv_blocks": 640, "num_threads": 1,
        "cpu_worker_address": cpu_address, "cpu_num_kv_blocks": 640, "cpu_max_rows": 8,
    }
    return ModelRunner(GpuWorkerConfig(**(settings | overrides)))


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in PROMPT_LENS]


def step_in(
    scheduler: ScriptedScheduler, mode: ExecutionMode, layout: OverlapLayout, swap_out: tuple[str, ...] = (),
    swap_in: tuple[str, ...] = (), swap_in_first: bool = True,
) -> StepOutput:
    return scheduler.run(replace(scheduler.plan(mode, swap_out, swap_in, swap_in_first=swap_in_first), layout=layout))


Scenario = Callable[[ScriptedScheduler, int, OverlapLayout], None]


def run(runner: ModelRunner, mode: ExecutionMode, placement: Callable[[int], Placement],
        scenario: Scenario | None = None, sub_batch: Callable[[int], int] = lambda i: 0,
        layout: OverlapLayout = OverlapLayout.FUSED) -> dict[str, list[int]]:
    """DECODE_STEPS steps in layout; prompt i arrives at step LATE.get(i, 0) with placement(i) and sub_batch(i)."""
    scheduler = ScriptedScheduler(runner)
    try:
        for step in range(DECODE_STEPS):
            for i, prompt in enumerate(prompts()):
                if LATE.get(i, 0) == step:
                    scheduler.add(f"r{i}", prompt, placement(i), sub_batch(i))
            if scenario is None:
                step_in(scheduler, mode, layout)
            else:
                scenario(scheduler, step, layout)
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


def swapping(scheduler: ScriptedScheduler, step: int, layout: OverlapLayout, swap_in_first: bool = True) -> None:
    """ASYNC_OVERLAP; every 20 steps the CPU-resident requests swap in and the GPU ones (running) swap out, in one
    plan whose swaps out take the CPU blocks its swaps in leave (swap_in_first) or whose swaps in take the
    accelerator blocks its swaps out leave."""
    running = [rid for rid, r in scheduler.requests.items() if r.outputs]
    if step % 20 == 10 and running:
        out = tuple(rid for rid in running if scheduler.requests[rid].placement is Placement.GPU)
        back = tuple(rid for rid in running if scheduler.requests[rid].placement is Placement.CPU)
        step_in(scheduler, ExecutionMode.ASYNC_OVERLAP, layout, out, back, swap_in_first)
    else:
        step_in(scheduler, ExecutionMode.ASYNC_OVERLAP, layout)


def swapping_outs_first(scheduler: ScriptedScheduler, step: int, layout: OverlapLayout) -> None:
    swapping(scheduler, step, layout, swap_in_first=False)


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
    "async_overlap_with_swaps_outs_first": (ExecutionMode.ASYNC_OVERLAP, alternate, swapping_outs_first, lambda i: 0),
}


SPLIT_CASES = ("async_overlap_alternate_rows", "asym_pipeline_mixed_sub_batches")  # both mix prefill rows in


@pytest.mark.parametrize(("case", "layout"), [
    *((case, OverlapLayout.FUSED) for case in CASES), *((case, OverlapLayout.SPLIT) for case in SPLIT_CASES)
], ids=lambda value: value.value if isinstance(value, OverlapLayout) else value)
def test_hybrid_mode_decodes_the_tokens_of_gpu_only_and_transformers(
    case: str, layout: OverlapLayout, reference: tuple[Path, dict[str, list[int]]], cpu_worker: str
) -> None:
    model_dir, expected = reference
    mode, placement, scenario, sub_batch = CASES[case]
    tokens = run(make_runner(model_dir, cpu_worker), mode, placement, scenario, sub_batch, layout)
    assert min(len(t) for t in tokens.values()) >= DECODE_STEPS - max(LATE.values()) - 1
    for rid in expected:
        assert tokens[rid] == expected[rid], f"{case}, {layout.value}: {rid} diverges from the GPU-only run"


def linear_passes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The rows of every norm/QKV/RoPE and O-proj/MLP call the forward makes from now on (each is a pass over
    those weights), in call order."""
    rows: dict[str, list[int]] = {"qkv": [], "mlp": []}

    def pre(layer: object, hidden: torch.Tensor, positions: torch.Tensor) -> object:
        rows["qkv"].append(hidden.shape[0])
        return pre_attention(layer, hidden, positions)

    def post(layer: object, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        rows["mlp"].append(hidden.shape[0])
        return post_attention(layer, hidden, attn)

    pre_attention, post_attention = forward.pre_attention, forward.post_attention
    monkeypatch.setattr(forward, "pre_attention", pre)
    monkeypatch.setattr(forward, "post_attention", post)
    return rows


@pytest.mark.parametrize("layout", list(OverlapLayout), ids=lambda layout: layout.value)
def test_fused_layout_passes_over_each_weight_once_per_layer_and_split_twice_in_a_mixed_step(
    layout: OverlapLayout, mha_model_dir: Path, cpu_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(mha_model_dir, cpu_worker)
    scheduler = ScriptedScheduler(runner)
    try:
        for i, prompt in enumerate(prompts()[:4]):  # 2 decode rows on each side, then 2 prefill rows (3 + 9 tokens)
            scheduler.add(f"r{i}", prompt[:5], [Placement.CPU, Placement.GPU][i % 2])
        step_in(scheduler, ExecutionMode.ASYNC_OVERLAP, layout)
        for i, prompt in enumerate(prompts()[:2]):
            scheduler.add(f"p{i}", prompt, [Placement.CPU, Placement.GPU][i % 2])
        rows = linear_passes(monkeypatch)
        tokens = step_in(scheduler, ExecutionMode.ASYNC_OVERLAP, layout).sampled
    finally:
        runner.close()
    assert set(tokens) == {"r0", "r1", "r2", "r3", "p0", "p1"}
    layers = runner.model_config.num_hidden_layers
    all_rows, cpu_rows, prefill_rows = 4 + 3 + 9, 2, 3 + 9
    if layout is OverlapLayout.FUSED:
        assert rows["qkv"] == [all_rows] * layers
        assert rows["mlp"] == [all_rows] * (layers - 1) + [6], "the last layer runs over the kept rows only"
    else:
        assert rows["qkv"] == [cpu_rows, all_rows - cpu_rows] * layers
        assert rows["mlp"] == [prefill_rows, 4] * (layers - 1) + [2, 4]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_step_reports_cpu_attention_staging_and_wait_times(device: str, mha_model_dir: Path, cpu_worker: str) -> None:
    """On CUDA an unsampled step's splits are device time from timing events: the compute stream's subtasks fit in
    the forward's wall time."""
    runner = make_runner(mha_model_dir, cpu_worker, device=device)
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
@pytest.mark.parametrize("layout", list(OverlapLayout), ids=lambda layout: layout.value)
@pytest.mark.parametrize("case", ["async_overlap_alternate_rows", "asym_pipeline_mixed_sub_batches",
                                  "async_overlap_with_swaps", "async_overlap_with_swaps_outs_first"])
def test_cuda_device_hybrid_modes_decode_the_cuda_gpu_only_tokens(
    case: str, layout: OverlapLayout, mha_model_dir: Path, cpu_worker: str
) -> None:
    """On CUDA the CPU rows' q/k/v go through pinned shared memory on a side stream (CudaHostTransfer): in the fused
    layout slices of the one QKV GEMM's output, in the split layout the CPU rows' own GEMM's."""
    mode, placement, scenario, sub_batch = CASES[case]
    gpu_only = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.GPU_ONLY,
                   lambda i: Placement.GPU)
    hybrid = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), mode, placement, scenario, sub_batch, layout)
    assert hybrid == gpu_only


@pytest.mark.parametrize("case", ["async_overlap_alternate_rows", "asym_pipeline_mixed_sub_batches",
                                  "async_overlap_with_swaps", "async_overlap_with_swaps_outs_first"])
def test_a_device_that_queues_its_copies_decodes_the_gpu_only_tokens(
    case: str, reference: tuple[Path, dict[str, list[int]]], cpu_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies land only once a marker after them is synchronised, as on CUDA (tests/queued_transfer.py): the staged
    q/k/v before each ring, the slot's o before its next ring, and the CPU-placed prefills' KV and swapped-out
    blocks before their writes into the CPU pool, each off the thread that runs the forward."""
    monkeypatch.setattr(cpu_pool, "host_transfer_for", lambda device: QueuedTransfer(delay_s=0.0))
    model_dir, expected = reference
    mode, placement, scenario, sub_batch = CASES[case]
    tokens = run(make_runner(model_dir, cpu_worker), mode, placement, scenario, sub_batch)
    for rid in expected:
        assert tokens[rid] == expected[rid], f"{case}: {rid} diverges from the GPU-only run"


@pytest.mark.gpu
def test_cuda_staging_copies_wait_for_a_delayed_compute_stream(
    mha_model_dir: Path, cpu_worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compute stream sleeps before every QKV projection, so the q/k/v the CPU rows stage are produced late: the
    side stream's copies must wait for them (and the doorbell for the copies), else the CPU attends stale staging and
    the tokens leave GPU-only's."""
    project = forward.pre_attention

    def delayed(*args: object) -> object:
        torch.cuda._sleep(5_000_000)  # GPU cycles (a few ms) queued on the current, compute, stream
        return project(*args)

    mode, placement, scenario, sub_batch = CASES["async_overlap_alternate_rows"]
    gpu_only = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.GPU_ONLY,
                   lambda i: Placement.GPU)
    monkeypatch.setattr(forward, "pre_attention", delayed)
    hybrid = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), mode, placement, scenario, sub_batch)
    assert hybrid == gpu_only


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", ["async_overlap_alternate_rows", "async_overlap_with_swaps",
                                  "asym_pipeline_mixed_sub_batches"])
def test_decode_steps_replaying_graphed_layers_decode_the_plain_paths_tokens(
    case: str, device: str, mha_model_dir: Path, cpu_worker: str
) -> None:
    """Decode-only sub-batches replay each layer's linear pieces at their bucket of rows (CUDA graphs on CUDA; the same
    static buffers run eagerly on the CPU), ASYM_PIPELINE's two interleaved sub-batches each on their own buffers, and
    sub-batches with prefill rows run the plain path; the tokens are the plain run's."""
    mode, placement, scenario, sub_batch = CASES[case]
    plain = run(make_runner(mha_model_dir, cpu_worker, device=device), mode, placement, scenario, sub_batch)
    runner = make_runner(mha_model_dir, cpu_worker, device=device, cuda_graph_max_rows=8)
    graphed = run(runner, mode, placement, scenario, sub_batch)
    assert graphed == plain
    replays = runner.forward.graphs.replays
    assert set(replays) <= {1, 2, 4, 8} and sum(replays.values()) > DECODE_STEPS / 2, replays


class RefusingCudart:
    """A CUDA runtime that refuses every host registration (as a locked-memory limit would)."""

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # the runtime's name
        return 2  # cudaErrorMemoryAllocation

    def cudaHostUnregister(self, ptr: int) -> int:
        return 0


@pytest.mark.gpu
def test_cuda_hybrid_decodes_the_gpu_only_tokens_through_pageable_staging_when_pinning_is_refused(
    mha_model_dir: Path, cpu_worker: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(host_transfer, "HostRegistry", lambda cudart: HostRegistry(RefusingCudart()))
    mode, placement, scenario, sub_batch = CASES["async_overlap_alternate_rows"]
    gpu_only = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.GPU_ONLY,
                   lambda i: Placement.GPU)
    with caplog.at_level("WARNING"):
        hybrid = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), mode, placement, scenario, sub_batch)
    assert "stay pageable" in caplog.text
    assert hybrid == gpu_only
