"""The engine on a CUDA device gives the CPU engine's tokens (skipped without CUDA)."""

from pathlib import Path

import pytest

from apex_serve.types import SamplingParams
from apex_tools.local_engine import LocalEngine
from gpu_worker.config import GpuWorkerConfig

pytestmark = pytest.mark.gpu


def test_cuda_engine_matches_cpu_engine_greedy(default_model_dir: Path) -> None:
    prompts = [[256, *range(10 + i, 30 + 3 * i)] for i in range(4)]
    sampling = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    cpu = LocalEngine(GpuWorkerConfig(model_dir=str(default_model_dir), device="cpu")).generate(prompts, sampling)
    cuda = LocalEngine(GpuWorkerConfig(model_dir=str(default_model_dir), device="cuda")).generate(prompts, sampling)
    assert [g.token_ids for g in cuda] == [g.token_ids for g in cpu]
