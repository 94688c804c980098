"""The three policies' plans on a real ModelRunner with a real cpu_attention_worker: every plan is accepted, the
greedy tokens equal the gpu-only run's (whatever modes, placements, swaps and preemptions happened), and at the end
both pools are free on the scheduler's side and the worker holds no request. The same with every plan made ahead of
the previous step's output (asynchronous scheduling), with stop tokens and an abort that land while a plan made ahead
of them is in flight."""

import json
import random
from collections import Counter, deque
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


def serve(model_dir: Path, cpu_address: str, policy: str, gpu_blocks: int, ahead: bool = False,
          stops: dict[str, int] | None = None, abort_after: tuple[str, int] | None = None,
          ) -> tuple[dict[str, list[int]], Counter]:
    """Tokens per request and iterations per mode. ahead: each plan is made before the previous step's output is
    taken (the worker runs the plans in order); stops: a stop token per request; abort_after: (request, n) aborts the
    request once it has n tokens, with a plan that schedules it in flight when ahead."""
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
            stop = (stops[f"r{i}"],) if stops and f"r{i}" in stops else ()
            scheduler.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                  ignore_eos=True, stop_token_ids=stop))
            tokens[f"r{i}"] = []
        modes: Counter = Counter()
        flights: deque = deque()  # (plan, output): run by the worker, output not yet taken
        ended: set[str] = set()  # requests whose finish or abort the scheduler has taken
        while scheduler.has_work() or flights:
            if scheduler.has_work() and len(flights) < 1 + ahead:
                plan = scheduler.schedule()
                assert plan.planned_ahead <= bool(flights)
                in_plan = {r.request_id for r in plan.new_requests} | {r.request_id for r in plan.cached_requests}
                assert not in_plan & ended, f"step {plan.step_id} schedules {in_plan & ended}, known to have ended"
                flights.append((plan, runner.execute(plan)))
                if not plan.is_empty:
                    modes[plan.mode] += 1
                if len(flights) < 1 + ahead:
                    continue  # plan the next step before this one's output is taken
            plan, output = flights.popleft()
            for out in scheduler.update_from_output(plan, output).outputs:
                tokens[out.request_id] += list(out.new_token_ids)
                if out.finished:
                    ended.add(out.request_id)
            if abort_after and len(tokens[abort_after[0]]) == abort_after[1] and abort_after[0] not in ended:
                assert scheduler.abort(abort_after[0])
                ended.add(abort_after[0])
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


@pytest.mark.parametrize("policy", ["gpu-only", "neo", "apex"])
def test_plans_made_ahead_of_each_steps_output_decode_the_same_tokens_stop_and_abort_on_time(
    mha_model_dir: Path, cpu_worker: str, reference: dict[str, list[int]], policy: str,
) -> None:
    # stop tokens taken from the reference run mid-way: each request must end on the first one, without the token the
    # plan made ahead of that step computed for it; r3 is aborted after 5 tokens with the next step in flight
    stops = {rid: ref[len(ref) // 2] for rid, ref in reference.items() if rid in ("r0", "r2", "r4", "r9")}
    tokens, _ = serve(mha_model_dir, cpu_worker, policy, gpu_blocks=24, ahead=True, stops=stops,
                      abort_after=("r3", 5))
    expected = {}
    for rid, ref in reference.items():
        end = ref.index(stops[rid]) + 1 if rid in stops else len(ref)
        expected[rid] = ref[:5] if rid == "r3" else ref[:end]
    assert tokens == expected

