"""The three policies' plans on a real ModelRunner with a real cpu_attention_worker: every plan is accepted, the
greedy tokens equal the gpu-only run's (whatever modes, placements, swaps and preemptions happened), and at the end
both pools are free on the scheduler's side and the worker holds no request."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from apex_serve.types import ExecutionMode, Placement, SamplingParams, WorkerInfo
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.cost.shape import model_shape_from_config
from scheduler_service.scheduler import Scheduler

PROMPT_LENS = (3, 9, 17, 30, 5, 24, 12, 40, 7, 21)
MAX_TOKENS = (30, 12, 25, 8, 40, 16, 33, 10, 22, 28)
# linear work proportional to the rows and CPU attention cheap: CPU rows pay for themselves under both hybrid policies
# (apex mixes GPU_ONLY and ASYNC_OVERLAP, neo pipelines)
COSTS = ConstantCosts(lin_ns=20_000.0, lin_ns_per_token=40_000.0, pref_ns_per_token=500.0, gatt_ns_per_row=2_000.0,
                      gatt_ns_per_kv_token=50.0, catt_ns_per_row=2_000.0, catt_ns_per_kv_token=100.0,
                      xfer_ns_per_byte=0.01, sync_ns=2_000.0, step_ns=100_000.0)


def serve(model_dir: Path, cpu_address: str, policy: str, gpu_blocks: int) -> tuple[dict[str, list[int]], Counter]:
    runner = ModelRunner(GpuWorkerConfig(
        model_dir=str(model_dir), device="cpu", block_size=4, num_kv_blocks=gpu_blocks, num_threads=1,
        cpu_worker_address=cpu_address, cpu_num_kv_blocks=400, cpu_max_rows=3,
    ))
    try:
        info: WorkerInfo = runner.info
        shape = model_shape_from_config(json.loads((model_dir / "config.json").read_text()))
        cost_model = ConstantCostModel(COSTS, shape) if policy != "gpu-only" else None
        scheduler = Scheduler(SchedulerConfig(policy=policy, max_sit_out=2), info, cost_model)
        rng = random.Random(5)
        tokens: dict[str, list[int]] = {}
        for i, (n, max_tokens) in enumerate(zip(PROMPT_LENS, MAX_TOKENS)):
            prompt = [256] + [rng.randrange(256) for _ in range(n - 1)]
            scheduler.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True))
            tokens[f"r{i}"] = []
        modes: Counter = Counter()
        while scheduler.has_work():
            plan = scheduler.schedule()
            output = runner.execute(plan)
            if not plan.is_empty:
                modes[plan.mode] += 1
            for out in scheduler.update_from_output(plan, output).outputs:
                tokens[out.request_id] += list(out.new_token_ids)
        stats = scheduler.stats()
        assert stats.free_blocks[Placement.GPU] == stats.total_blocks[Placement.GPU]
        assert stats.free_blocks[Placement.CPU] == stats.total_blocks[Placement.CPU]
        assert runner._requests == {}, "the worker still holds requests after the last plan"
        return tokens, modes
    finally:
        runner.close()


@pytest.fixture(scope="module")
def reference(mha_model_dir: Path, cpu_worker: str) -> dict[str, list[int]]:
    tokens, modes = serve(mha_model_dir, cpu_worker, "gpu-only", gpu_blocks=400)
    assert set(modes) == {ExecutionMode.GPU_ONLY}
    assert [len(tokens[f"r{i}"]) for i in range(len(MAX_TOKENS))] == list(MAX_TOKENS)
    return tokens


@pytest.mark.parametrize("policy, hybrid_mode", [("gpu-only", None), ("neo", ExecutionMode.ASYM_PIPELINE),
                                                 ("apex", ExecutionMode.ASYNC_OVERLAP)])
def test_policy_on_a_small_accelerator_pool_decodes_the_tokens_of_an_unconstrained_run(
    mha_model_dir: Path, cpu_worker: str, reference: dict[str, list[int]], policy: str,
    hybrid_mode: ExecutionMode | None,
) -> None:
    tokens, modes = serve(mha_model_dir, cpu_worker, policy, gpu_blocks=24)  # 96 tokens: about two requests
    assert tokens == reference
    if hybrid_mode is not None:
        assert modes[hybrid_mode] > 0, f"{policy} never chose {hybrid_mode.value}: {dict(modes)}"
