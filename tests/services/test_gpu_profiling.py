"""The gpu_worker's Measure runs on a live worker: requests decoding in its KV pool are not disturbed by it; prefill
is measured over scratch space, so a pool of a few blocks profiles prompts and chunks up to max_model_len."""

from pathlib import Path

import pytest
import torch

from apex_serve.errors import InvalidArgument
from apex_serve.types import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.profiling import LayerProfiler

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def decode(runner: ModelRunner, profile_between_steps: bool) -> list[int]:
    """Greedy tokens of one request in blocks 0-7, with t_pref, t_gatt and t_step measured between its steps (they
    write into the pool's blocks, the request's among them; t_step runs whole decode steps of requests of its own)."""
    prompt = (256, *range(40, 60))
    tokens = [runner.execute(StepPlan(0, (NewRequestData("r", prompt, GREEDY, tuple(range(8))),))).sampled["r"]]
    profiler = LayerProfiler(runner)
    for step in range(1, 12):
        if profile_between_steps:
            profiler.measure("t_pref", [(64, 0)], warmup=0, repeats=1)
            profiler.measure("t_gatt", [(2, 32)], warmup=0, repeats=1)
            assert profiler.measure("t_step", [(3, 0)], warmup=0, repeats=1)[0] > 0
        tokens.append(runner.execute(StepPlan(step, cached_requests=(CachedRequestData("r"),))).sampled["r"])
    return tokens


def test_profiling_between_steps_leaves_a_running_requests_tokens_unchanged(mha_model_dir: Path) -> None:
    def runner() -> ModelRunner:
        return ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", block_size=4, num_kv_blocks=16))

    assert decode(runner(), profile_between_steps=True) == decode(runner(), profile_between_steps=False)


def test_t_pref_of_prompts_and_chunks_far_beyond_a_four_block_pool_measures_without_touching_it(
    mha_model_dir: Path,
) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", block_size=4, num_kv_blocks=4,
                                         max_model_len=768))
    pool = runner.kv_cache
    pool.k.normal_()
    pool.v.normal_()
    before = pool.k.clone(), pool.v.clone()
    profiler = LayerProfiler(runner)
    whole, chunk = profiler.measure("t_pref", [(512, 0), (256, 512)], warmup=0, repeats=1)
    assert whole > 0 and chunk > 0
    assert profiler.measure("t_gatt", [(2, 8)], warmup=0, repeats=1)[0] > 0  # fits the pool: 2 rows of 1 block
    assert torch.equal(pool.k, before[0]) and torch.equal(pool.v, before[1]), "t_pref wrote into the pool"
    with pytest.raises(InvalidArgument, match=r"y: 100 is outside \[0, 68\]"):
        profiler.measure("t_pref", [(700, 100)], warmup=0, repeats=1)
    with pytest.raises(InvalidArgument, match=r"x: 769 is outside \[1, 768\]"):
        profiler.measure("t_pref", [(769, 0)], warmup=0, repeats=1)


def test_t_step_runs_whole_decode_steps_and_leaves_the_pool_and_the_requests_as_they_were(mha_model_dir: Path) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", block_size=4, num_kv_blocks=16))
    runner.execute(StepPlan(0, (NewRequestData("r", (256, 40, 41), GREEDY, (0,)),)))
    pool = runner.kv_cache
    pool.k.normal_()
    pool.v.normal_()
    before = pool.k.clone(), pool.v.clone()
    [per_step] = LayerProfiler(runner).measure("t_step", [(4, 0)], warmup=1, repeats=3)
    assert per_step > 0
    assert torch.equal(pool.k, before[0]) and torch.equal(pool.v, before[1]), "t_step's steps wrote into the pool"
    assert list(runner.execute(StepPlan(1, cached_requests=(CachedRequestData("r"),))).sampled) == ["r"]
    assert runner.reset() == 1, "t_step left requests of its own in the worker"
