"""The engine on a CUDA device gives the CPU engine's tokens (skipped without CUDA)."""

from pathlib import Path

import pytest
import torch

from apex_serve.types import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from apex_tools.local_engine import LocalEngine
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner

pytestmark = pytest.mark.gpu


def test_cuda_engine_matches_cpu_engine_greedy(default_model_dir: Path) -> None:
    prompts = [[256, *range(10 + i, 30 + 3 * i)] for i in range(4)]
    sampling = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    cpu = LocalEngine(GpuWorkerConfig(model_dir=str(default_model_dir), device="cpu")).generate(prompts, sampling)
    cuda = LocalEngine(GpuWorkerConfig(model_dir=str(default_model_dir), device="cuda", dtype="float32")).generate(
        prompts, sampling)
    assert [g.token_ids for g in cuda] == [g.token_ids for g in cpu]


def test_cuda_unsampled_steps_time_their_subtasks_on_the_device(default_model_dir: Path) -> None:
    """Timing events, not host launch times: the compute stream's subtasks are positive and fit in the forward."""
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(default_model_dir), device="cuda", num_kv_blocks=8))
    request = NewRequestData("a", (256, *range(1, 40)), SamplingParams(temperature=0.0), (0, 1, 2))
    runner.execute(StepPlan(0, (request,)))
    out = runner.execute(StepPlan(1, cached_requests=(CachedRequestData("a"),)))
    t = out.timings
    assert not out.subtasks and t.device_linear_ns > 0 and t.device_attention_ns > 0
    assert t.device_linear_ns + t.device_attention_ns <= t.forward_ns


def test_cuda_runner_sizes_its_kv_pool_from_the_devices_memory(default_model_dir: Path) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(default_model_dir), device="cuda", gpu_memory_utilization=0.5))
    pool = runner.kv_cache
    pool_bytes = pool.k.numel() * pool.k.element_size() * 2
    total = torch.cuda.get_device_properties(runner.device).total_memory
    assert runner.info.dtype == "float16" and runner.info.num_kv_blocks > 0
    assert pool_bytes <= 0.5 * total
