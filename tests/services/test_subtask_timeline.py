"""Sampled steps: the gpu_worker returns each layer's subtask intervals on both lanes, the CPU side's stamped by the
cpu_attention_worker's serving thread in shared memory; they add up to the step's summed timings."""

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from test_hybrid_execution import make_runner, prompts

from apex_serve.types import ExecutionMode, Placement, StepOutput, SubtaskKind
from apex_tools.bench.scripted_scheduler import ScriptedScheduler


def sampled_steps(model_dir: Path, cpu_address: str, mode: ExecutionMode, record: bool,
                  device: str = "cpu") -> list[StepOutput]:
    """Prefill 4 requests (CPU and accelerator alternating, two sub-batches), then 3 decode steps."""
    runner = make_runner(model_dir, cpu_address, device=device)
    driver = ScriptedScheduler(runner)
    try:
        for i, prompt in enumerate(prompts()[:4]):
            pipelined = mode is ExecutionMode.ASYM_PIPELINE
            driver.add(f"r{i}", prompt, [Placement.CPU, Placement.GPU][i % 2], sub_batch=i // 2 if pipelined else 0)
        outputs = [driver.run(dataclasses.replace(driver.plan(mode), record_subtasks=record)) for _ in range(4)]
        return outputs
    finally:
        runner.close()


def test_sampled_async_overlap_step_has_every_layers_subtasks_and_they_add_up_to_the_timings(
    mha_model_dir: Path, cpu_worker: str
) -> None:
    out = sampled_steps(mha_model_dir, cpu_worker, ExecutionMode.ASYNC_OVERLAP, record=True)[-1]
    num_layers = 2
    kinds_by_layer = {(s.kind, s.layer) for s in out.subtasks}
    for layer in range(num_layers):
        for kind in SubtaskKind:
            assert (kind, layer) in kinds_by_layer, f"layer {layer} has no {kind.value} interval"
    assert (SubtaskKind.DEVICE_LINEAR, num_layers) in kinds_by_layer  # the LM head
    total: Counter[SubtaskKind] = Counter()
    for s in out.subtasks:
        total[s.kind] += s.end_unix_ns - s.start_unix_ns
    t = out.timings
    # the same clock readings feed both: the sums are equal to the nanosecond
    assert total[SubtaskKind.CPU_ATTENTION] == t.cpu_attention_ns
    assert total[SubtaskKind.DEVICE_LINEAR] == t.device_linear_ns
    assert total[SubtaskKind.DEVICE_ATTENTION] == t.device_attention_ns
    assert total[SubtaskKind.STAGING] == t.staging_ns
    starts = [s.start_unix_ns for s in out.subtasks]
    assert starts == sorted(starts)
    slack = 2_000_000  # the wall clock is read once per step; the intervals are monotonic-clock readings moved to it
    for s in out.subtasks:
        assert t.start_unix_ns - slack <= s.start_unix_ns <= s.end_unix_ns <= t.start_unix_ns + t.total_ns + slack


def test_asym_pipeline_sampled_step_records_both_sub_batches_cpu_attention(
    mha_model_dir: Path, cpu_worker: str
) -> None:
    out = sampled_steps(mha_model_dir, cpu_worker, ExecutionMode.ASYM_PIPELINE, record=True)[-1]
    cpu = [s for s in out.subtasks if s.kind is SubtaskKind.CPU_ATTENTION]
    assert {(s.layer, s.sub_batch) for s in cpu} == {(layer, b) for layer in range(2) for b in range(2)}


def test_unsampled_steps_return_no_subtasks(mha_model_dir: Path, cpu_worker: str) -> None:
    outputs = sampled_steps(mha_model_dir, cpu_worker, ExecutionMode.ASYNC_OVERLAP, record=False)
    assert all(not o.subtasks and o.timings.start_unix_ns > 0 for o in outputs)


@pytest.mark.gpu
def test_cuda_sampled_step_intervals_cover_the_devices_work(mha_model_dir: Path, cpu_worker: str) -> None:
    """On CUDA a sampled step synchronises at the end of each interval, so the intervals are the device's work and
    still add up to the step's timings."""
    out = sampled_steps(mha_model_dir, cpu_worker, ExecutionMode.ASYNC_OVERLAP, record=True, device="cuda")[-1]
    total = sum(s.end_unix_ns - s.start_unix_ns for s in out.subtasks if s.kind is SubtaskKind.DEVICE_LINEAR)
    assert total == out.timings.device_linear_ns > 0
    assert {s.kind for s in out.subtasks} == set(SubtaskKind)
