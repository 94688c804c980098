"""The TPOT objective (--tpot-slo-ms) on the whole stack under apex, with a device KV pool of one request so that the
others decode from the CPU pool. The requests are sent one after the other, each once the one before it has its
first token, so the iterations run from 1 to 7 CPU rows. With a loose objective hybrid iterations run at every
count. The binding objective is DECODE_MARGIN above the loose run's longest predicted decode step with CPU rows (no
prefill in it): a steady decode step of every CPU request fits under it (so apex still places requests on the CPU
pool), while the loose run's longest hybrid iterations (those with a prefill) were predicted above it. With it, hybrid
iterations still run, every iteration that runs CPU rows is predicted at or under it, and every request is served to
its length. Read from the scheduler's GetStats (recent_iterations: cpu_rows, predicted_ns); nothing here depends on
wall-clock time.

The stacks keep their profile where the suite's stacks keep theirs (StackConfig.profile_dir), so the default model is
profiled once per suite."""

import asyncio
from collections import defaultdict

import grpc
import pytest

from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from apex_tools.bench.faults import StreamRecord, generate, scheduler_address
from apex_tools.launcher import Stack
from conftest import running_stack

DEVICE_BLOCKS = 4  # 64 tokens: one request at a time
NUM_REQUESTS = 8
MAX_TOKENS = 24
PROMPTS = [f"request {i}: the quick brown fox" for i in range(NUM_REQUESTS)]  # about 30 tokens each
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
LOOSE_TPOT_SLO_MS = 60_000.0
STREAM_TIMEOUT_S = 120.0
# The online correction starts afresh in each run, so the binding run predicts the first decode steps with CPU rows
# (those its admissions onto the CPU pool price) somewhat differently from the loose run: the objective keeps this
# margin above the loose run's decode predictions.
DECODE_MARGIN = 1.1
# Past the run's length: only the objective decides when a CPU request runs (rows that max_sit_out forces in run even
# where no option keeps the objective, scheduler_service/objectives.py)
MAX_SIT_OUT = 1000


async def _serve(stack: Stack) -> tuple[list[StreamRecord], scheduler_pb2.SchedulerStats]:
    """Every prompt, each sent once the one before it has its first token; the scheduler's stats after."""
    started = [asyncio.Event() for _ in PROMPTS]
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(i: int) -> StreamRecord:
            if i:
                await started[i - 1].wait()
            return await generate(stub, PROMPTS[i], GREEDY, timeout_s=STREAM_TIMEOUT_S,
                                  on_tokens=lambda _: started[i].set())

        records = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as channel:
        stats = await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())
    return list(records), stats


def _run(default_model_dir: object, tpot_slo_ms: float) -> tuple[list[StreamRecord], scheduler_pb2.SchedulerStats]:
    with running_stack(default_model_dir, policy="apex", num_kv_blocks=DEVICE_BLOCKS, tpot_slo_ms=tpot_slo_ms,
                       max_sit_out=MAX_SIT_OUT) as stack:
        return asyncio.run(_serve(stack))


def _assert_served(records: list[StreamRecord], what: str) -> None:
    for i, record in enumerate(records):
        assert record.completed, f"{what}, request {i}: ended {record.error_code}: {record.error_message}"
        assert record.completion_tokens == MAX_TOKENS, f"{what}, request {i}: {record.completion_tokens} tokens"


@pytest.fixture(scope="module")
def loose_run(default_model_dir: object) -> tuple[list[StreamRecord], scheduler_pb2.SchedulerStats]:
    return _run(default_model_dir, LOOSE_TPOT_SLO_MS)


def test_with_a_loose_tpot_objective_apex_runs_hybrid_iterations(
    loose_run: tuple[list[StreamRecord], scheduler_pb2.SchedulerStats],
) -> None:
    records, stats = loose_run
    _assert_served(records, "loose objective")
    hybrid = [it for it in stats.recent_iterations if it.cpu_rows]
    assert hybrid, f"no iteration ran CPU rows: {dict(stats.iterations_by_mode)}"
    assert all(it.predicted_ns > 0 for it in hybrid), "a hybrid iteration has no prediction"
    counts = sorted({it.cpu_rows for it in hybrid})
    assert len(counts) > 1, f"every hybrid iteration ran {counts} CPU rows: the requests did not arrive one by one"


def test_every_hybrid_iteration_is_predicted_within_a_binding_tpot_objective(
    default_model_dir: object, loose_run: tuple[list[StreamRecord], scheduler_pb2.SchedulerStats],
) -> None:
    _, loose_stats = loose_run
    by_rows: dict[int, list[float]] = defaultdict(list)  # decode iterations only
    for it in loose_stats.recent_iterations:
        if it.cpu_rows and not it.num_prefills:
            by_rows[it.cpu_rows].append(it.predicted_ns)
    assert len(by_rows) > 1, f"the loose run's decode iterations ran {sorted(by_rows)} CPU rows"
    per_count = {k: max(v) for k, v in sorted(by_rows.items())}
    objective_ns = DECODE_MARGIN * max(per_count.values())
    longest = max(it.predicted_ns for it in loose_stats.recent_iterations if it.cpu_rows)
    assert longest > objective_ns, f"the objective would not bind: {per_count}, longest {longest / 1e6:.3f} ms"

    records, stats = _run(default_model_dir, objective_ns / 1e6)

    what = f"the {objective_ns / 1e6:.3f} ms TPOT objective"
    _assert_served(records, what)
    hybrid = [it for it in stats.recent_iterations if it.cpu_rows]
    loose_ms = {k: round(v / 1e6, 3) for k, v in per_count.items()}
    assert hybrid, f"apex ran no CPU rows under {what}, above the loose run's longest decode at {loose_ms} CPU rows"
    over = [(it.step_id, it.cpu_rows, round(it.predicted_ns / 1e6, 3))
            for it in hybrid if it.predicted_ns > objective_ns]
    assert not over, f"iterations (step, CPU rows, predicted ms) with CPU rows predicted over {what}: {over}"
