"""Chunked prefill under the step's token budget and requests larger than the accelerator's pool, on the fake hybrid
worker (which checks every plan and samples a token fixed by request and position, so a chunked or recomputed prefill
must yield the tokens of a whole one): no plan exceeds the budget under any policy; running decodes keep decoding
beside a long prompt's chunks; a prompt near the context length is served whatever the budget; a request that fits
only the CPU pool runs there under the hybrid policies and is refused under gpu-only; aborts, evictions and a lost CPU
pool leave chunked requests consistent."""

import random
from dataclasses import replace

import pytest
from fake_hybrid_worker import HybridWorker, token_for
from test_scheduler_cpu_loss import Driver, assert_all_free, once
from test_scheduler_pools import COSTS, MODEL, check_blocks, worker

from apex_serve.errors import InvalidArgument
from apex_serve.types import Placement, SamplingParams, StepOutput, StepPlan
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ConstantCostModel, ConstantCosts
from scheduler_service.decision import Candidates
from scheduler_service.scheduler import Scheduler

POLICIES = ("gpu-only", "neo", "apex")
CPU_NEVER_PAYS = replace(COSTS, catt_ns_per_kv_token=1e7)  # no gains test would place a request on the CPU


def make(policy: str = "gpu-only", gpu_blocks: int = 40, cpu_blocks: int = 400, budget: int = 16,
         max_num_seqs: int = 8, max_model_len: int = 512, block_size: int = 4, costs: ConstantCosts = COSTS
         ) -> Scheduler:
    info = replace(worker(gpu_blocks, cpu_blocks), max_model_len=max_model_len, block_size=block_size)
    config = SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_sit_out=3)
    return Scheduler(config, info, ConstantCostModel(costs, MODEL) if policy != "gpu-only" else None)


def sp(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def expected(request_id: str, prompt: int, max_tokens: int) -> list[int]:
    return [token_for(request_id, prompt + k) for k in range(max_tokens)]


def step(s: Scheduler, w: HybridWorker, plan: StepPlan, tokens: dict[str, list[int]]) -> None:
    """Run the plan's step and add its sampled tokens to each request's."""
    for out in s.update_from_output(plan, w.execute(plan)).outputs:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)


def run(s: Scheduler, w: HybridWorker, plans: list[StepPlan], tokens: dict[str, list[int]] | None = None,
        max_steps: int = 5000) -> dict[str, list[int]]:
    """Steps until no work is left, checking the budget and the blocks each step; the tokens per request (added to
    `tokens`, where given)."""
    tokens = {} if tokens is None else tokens
    for _ in range(max_steps):
        if not s.has_work():
            return tokens
        plan = s.schedule()
        assert plan.num_tokens <= s.config.max_num_batched_tokens, f"step {plan.step_id}: {plan.num_tokens} tokens"
        check_blocks(s)
        plans.append(plan)
        step(s, w, plan, tokens)
        check_blocks(s)
    raise AssertionError(f"work left after {max_steps} steps")


def chunks_of(plans: list[StepPlan], request_id: str) -> list[tuple[str, int]]:
    """The request's prefill entries, plan by plan: ("new" or "chunk", tokens)."""
    out = []
    for plan in plans:
        out += [("new", n.num_prefill_tokens) for n in plan.new_requests if n.request_id == request_id]
        out += [("chunk", c.num_scheduled_tokens) for c in plan.cached_requests
                if c.request_id == request_id and c.num_scheduled_tokens]
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", range(2))
def test_no_plan_exceeds_the_token_budget_and_chunked_prompts_yield_their_tokens(policy: str, seed: int) -> None:
    rng = random.Random(seed)
    s = make(policy, gpu_blocks=40, budget=24, max_num_seqs=12)
    w = HybridWorker(s.worker_info)
    want, plans, tokens = {}, [], {}
    for i in range(40):
        prompt, max_tokens = rng.randint(1, 120), rng.randint(1, 30)
        s.add_request(f"r{i}", [5] * prompt, sp(max_tokens))
        want[f"r{i}"] = expected(f"r{i}", prompt, max_tokens)
        for _ in range(rng.randint(0, 3)):
            plan = s.schedule()
            assert plan.num_tokens <= 24, f"step {plan.step_id}: {plan.num_tokens} tokens"
            plans.append(plan)
            step(s, w, plan, tokens)
    assert run(s, w, plans, tokens) == want
    assert any(c.num_scheduled_tokens for p in plans for c in p.cached_requests), "no prompt was chunked"
    assert_all_free(s, w)


def test_running_decodes_keep_decoding_in_every_step_of_a_long_prompts_chunks() -> None:
    s = make(budget=16)
    w = HybridWorker(s.worker_info)
    for rid in "abc":
        s.add_request(rid, [5] * 2, sp(40))
    plans: list[StepPlan] = []
    for _ in range(2):
        plan = s.schedule()
        s.update_from_output(plan, w.execute(plan))
    s.add_request("long", [5] * 100, sp(3))
    steps = []
    while not steps or steps[-1][1] is False:
        plan = s.schedule()
        plans.append(plan)
        result = s.update_from_output(plan, w.execute(plan))
        decodes = {c.request_id for c in plan.cached_requests if not c.num_scheduled_tokens}
        assert decodes == {"a", "b", "c"}, f"step {plan.step_id} stalled a decode"
        assert {o.request_id for o in result.outputs} >= {"a", "b", "c"}
        assert result.record is not None and result.record.num_prefills == 1
        steps.append((plan.num_tokens, "long" in {o.request_id for o in result.outputs}))
    assert chunks_of(plans, "long") == [("new", 13)] + [("chunk", 13)] * 6 + [("chunk", 9)]
    assert [n for n, _ in steps] == [16] * 7 + [12]  # three decode rows first, the chunk takes what they leave


# a decode step's fixed work (the pass over the weights, 10 tokens' worth a layer) and its two rows: apex's ridge is a
# quarter of a 64 budget
RIDGE_COSTS = ConstantCosts(lin_ns=10_000.0, lin_ns_per_token=1_000.0, gatt_ns_per_kv_token=10.0,
                            catt_ns_per_kv_token=1e7)
FULL, ROOMY = 30, 100  # accelerator blocks of 4 tokens: beside "long", the first has no room for "next", the second has


def two_decoding_rows(policy: str, gpu_blocks: int
                      ) -> tuple[Scheduler, HybridWorker, list[StepPlan], dict[str, list[int]]]:
    """A 64-token budget at RIDGE_COSTS (CPU rows never pay: the accelerator's pool is the only one) whose requests
    "a" and "b" (2-token prompts, 40 tokens each) have run two steps: the plans and the tokens so far."""
    s = make(policy, gpu_blocks=gpu_blocks, budget=64, costs=RIDGE_COSTS)
    w = HybridWorker(s.worker_info)
    for rid in "ab":
        s.add_request(rid, [5] * 2, sp(40))
    plans: list[StepPlan] = []
    tokens: dict[str, list[int]] = {}
    for _ in range(2):
        plans.append(s.schedule())
        step(s, w, plans[-1], tokens)
    return s, w, plans, tokens


def spread_scenario(policy: str, gpu_blocks: int) -> tuple[int, dict[str, list[int]]]:
    """Two decoding rows, then a 12-token prompt and two of 60 tokens arrive at once: apex's ridge for the two rows
    and each prompt's chunks; every request's tokens equal to a whole prefill's."""
    s, w, plans, tokens = two_decoding_rows(policy, gpu_blocks)
    want = {rid: expected(rid, 2, 40) for rid in "ab"}
    for rid, prompt in (("short", 12), ("long", 60), ("next", 60)):
        s.add_request(rid, [5] * prompt, sp(3))
        want[rid] = expected(rid, prompt, 3)
    ridge = s.policy.chunk_tokens(Candidates([], 2, 10, [0], 0, 4), 62)  # the two rows leave 62 of the budget
    assert run(s, w, plans, tokens) == want
    assert_all_free(s, w)
    return ridge, {rid: [n for _, n in chunks_of(plans, rid)] for rid in ("short", "long", "next")}


@pytest.mark.parametrize("policy", POLICIES)
def test_apex_spreads_a_long_prompt_at_the_ridge_while_the_pools_are_full_and_admits_a_short_one_whole(policy: str
                                                                                                     ) -> None:
    ridge, chunks = spread_scenario(policy, FULL)
    assert chunks["short"] == [12]  # within the ridge: whole, under the budget, for every policy
    if policy == "apex":
        assert 15 < ridge < 20  # the ridge of two rows; "short" decoding beside them raises it by a token
        # "next" waits and would not fit beside "long": "long" goes at the ridge a step; "next", admitted once "long"
        # is done, is the last waiting (nothing behind it to make room for): at the ridge, then the rest at once
        long, after = chunks["long"], chunks["next"]
        assert len(long) == 4 and all(15 < n < 20 for n in long[:3]) and sum(long) == 60
        assert len(after) == 2 and 15 < after[0] < 20
    else:
        assert ridge == 62
        assert chunks["long"] == [62 - 12, 60 - (62 - 12)]  # what "short" leaves of the budget, then the rest


@pytest.mark.parametrize("policy", POLICIES)
def test_apex_admits_a_long_prompt_at_the_budget_while_the_pools_can_take_the_request_behind_it(policy: str) -> None:
    _, chunks = spread_scenario(policy, ROOMY)
    assert chunks["short"] == [12]
    assert chunks["long"] == [62 - 12, 60 - (62 - 12)]  # the batch can grow: what "short" leaves, as under gpu-only
    if policy == "apex":
        # the rest of "long" and the start of "next" (nothing behind it) share the ridge of three rows while "next"
        # waits; then nothing waits: the rest of "next" at once
        assert len(chunks["next"]) == 2 and chunks["long"][1] + chunks["next"][0] < 20
    else:
        assert chunks["next"] == [64 - 3 - 10, 9]  # what three rows and the rest of "long" leave, then the rest


def test_apex_admits_a_burst_of_prompts_longer_than_its_ridge_in_one_step_while_the_pools_have_room() -> None:
    s, w, _, tokens = two_decoding_rows("apex", ROOMY)
    burst = [f"p{k}" for k in range(4)]
    for rid in burst:
        s.add_request(rid, [5] * 20, sp(3))  # each longer than the two rows' ridge (16-17 tokens)
    plan = s.schedule()
    # the 62 tokens the rows leave: three prompts whole and the start of the fourth (nothing behind it: at the ridge)
    assert [(n.request_id, n.num_prefill_tokens) for n in plan.new_requests] == [("p0", 20), ("p1", 20), ("p2", 20),
                                                                                ("p3", 2)]
    step(s, w, plan, tokens)
    run(s, w, [plan], tokens)
    assert {rid: tokens[rid] for rid in burst} == {rid: expected(rid, 20, 3) for rid in burst}
    assert_all_free(s, w)


@pytest.mark.parametrize(("policy", "gpu_blocks"), [("gpu-only", 160), ("apex", 32)], ids=["gpu-only", "apex-cpu"])
def test_a_prompt_of_max_model_len_less_16_with_a_budget_of_512_is_served_exactly(policy: str, gpu_blocks: int
                                                                                 ) -> None:
    s = make(policy, gpu_blocks=gpu_blocks, cpu_blocks=400, budget=512, max_model_len=2048, block_size=16)
    w = HybridWorker(s.worker_info)
    s.add_request("long", [5] * 2032, sp(100))
    plans: list[StepPlan] = []
    tokens = run(s, w, plans)
    assert tokens == {"long": expected("long", 2032, 16)}  # the context length stops it after 16
    assert chunks_of(plans, "long") == [("new", 512), ("chunk", 512), ("chunk", 512), ("chunk", 496)]
    placement = plans[0].new_requests[0].placement
    assert placement is (Placement.GPU if policy == "gpu-only" else Placement.CPU)
    assert_all_free(s, w)


def test_a_cpu_placed_chunk_prices_its_context_brought_from_the_cpu_pool() -> None:
    s = make("apex", gpu_blocks=8, budget=16)
    s.add_request("big", [5] * 40, sp(4))
    w = HybridWorker(s.worker_info)
    plan = s.schedule()
    s.update_from_output(plan, w.execute(plan))
    s.schedule()
    (part,) = s.in_flight.shape.sub_batches
    assert part.prefill_lens == (16,) and part.prefill_contexts == (16,) and part.prefill_loaded_tokens == 16


@pytest.mark.parametrize("policy", ["neo", "apex"])
@pytest.mark.parametrize(("prompt", "max_tokens"), [(50, 10), (20, 30)], ids=["prompt-too-large", "peak-too-large"])
def test_a_request_larger_than_the_accelerator_pool_runs_on_the_cpu_under_hybrid_policies(
        policy: str, prompt: int, max_tokens: int) -> None:
    s = make(policy, gpu_blocks=8, costs=CPU_NEVER_PAYS)  # 32 tokens on the accelerator
    w = HybridWorker(s.worker_info)
    s.add_request("small", [5] * 4, sp(20))
    s.add_request("big", [5] * prompt, sp(max_tokens))
    plans: list[StepPlan] = []
    tokens = run(s, w, plans)
    assert tokens == {"small": expected("small", 4, 20), "big": expected("big", prompt, max_tokens)}
    admitted = {n.request_id: n.placement for p in plans for n in p.new_requests}
    assert admitted == {"small": Placement.GPU, "big": Placement.CPU}
    assert not any(x.request_id == "big" for p in plans for x in p.swap_in), "swapped to a pool it cannot fit"
    assert s.stats().num_preemptions == 0
    assert_all_free(s, w)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_4_block_accelerator_pool_serves_every_request_that_fits_a_pool_under_every_policy(policy: str) -> None:
    """16 accelerator tokens; 12 concurrent requests of 2 to 120 prompt tokens: the hybrid policies serve them all
    (the larger ones from the CPU pool), gpu-only those that fit its pool and refuses the others at once."""
    s = make(policy, gpu_blocks=4, budget=32)
    w = HybridWorker(s.worker_info)
    want, refused = {}, []
    for i, prompt in enumerate([2, 120, 5, 40, 9, 3, 70, 6, 11, 2, 90, 4]):
        try:
            s.add_request(f"r{i}", [5] * prompt, sp(4))
            want[f"r{i}"] = expected(f"r{i}", prompt, 4)
        except InvalidArgument:
            refused.append(prompt)
    assert run(s, w, []) == want
    assert refused == ([120, 40, 70, 90] if policy == "gpu-only" else [])
    assert_all_free(s, w)


@pytest.mark.parametrize(("prompt", "max_tokens", "field"), [(50, 10, "prompt"), (20, 30, "max_tokens")])
def test_a_request_larger_than_the_accelerator_pool_is_invalid_argument_under_gpu_only(
        prompt: int, max_tokens: int, field: str) -> None:
    s = make("gpu-only", gpu_blocks=8)
    with pytest.raises(InvalidArgument) as info:
        s.add_request("big", [5] * prompt, sp(max_tokens))
    assert info.value.field == field
    assert "the largest KV pool, the accelerator's (8 blocks of 4 tokens), holds 32" in str(info.value)
    assert s.stats().num_waiting == 0


@pytest.mark.parametrize("policy", ["gpu-only", "apex"])
@pytest.mark.parametrize("in_flight", [False, True], ids=["between-steps", "in-flight"])
def test_abort_mid_prefill_frees_every_block_and_the_worker_state(policy: str, in_flight: bool) -> None:
    s = make(policy, gpu_blocks=8 if policy == "apex" else 40, budget=16)  # apex: on the CPU
    w = HybridWorker(s.worker_info)
    s.add_request("long", [5] * 100, sp(4))
    plan = s.schedule()
    s.update_from_output(plan, w.execute(plan))
    plan = s.schedule()
    if in_flight:
        assert s.abort("long")
        s.update_from_output(plan, w.execute(plan))
    else:
        s.update_from_output(plan, w.execute(plan))
        assert s.abort("long")
    stats = s.stats()
    assert stats.num_running == 0 and not s.running
    for placement in Placement:
        assert stats.free_blocks[placement] == stats.total_blocks[placement], f"{placement.value} blocks leaked"
    plan = s.schedule()
    assert plan.freed_request_ids == ("long",) and plan.is_empty
    w.execute(plan)
    assert not w.held and not s.has_work()


@pytest.mark.parametrize("policy", ["gpu-only", "apex"])
def test_a_request_still_prefilling_is_never_the_victim_of_eviction(policy: str) -> None:
    s = make(policy, gpu_blocks=12, budget=8, max_num_seqs=4)
    w = HybridWorker(s.worker_info)
    s.add_request("a", [5] * 4, sp(40))  # grows while b prefills
    s.add_request("b", [5] * 40, sp(4))  # 10 of the 12 blocks, in chunks of 7
    plans: list[StepPlan] = []
    tokens = run(s, w, plans)
    assert tokens == {"a": expected("a", 4, 40), "b": expected("b", 40, 4)}
    chunks = chunks_of(plans, "b")
    assert chunks[0] == ("new", 4) and all(kind == "chunk" for kind, _ in chunks[1:])
    assert sum(n for _, n in chunks) == 40, "b's prefill did not run to its end exactly once"
    stats = s.stats()
    assert stats.num_preemptions + stats.num_swaps > 0, "a never made room"
    assert not any(x.request_id == "b" for p in plans for x in p.swap_out)
    assert sum(n.request_id == "b" for p in plans for n in p.new_requests) == 1, "b was recomputed"
    assert_all_free(s, w)


def chunk_of(request_id: str):
    return lambda plan: any(c.request_id == request_id and c.num_scheduled_tokens for c in plan.cached_requests)


def test_a_lost_cpu_pool_requeues_a_cpu_placed_request_still_prefilling() -> None:
    arrivals = {0: [("big", 60, 8), ("s", 6, 12)], 3: [("t", 8, 10)]}
    undisturbed = Driver(make("apex", gpu_blocks=12), HybridWorker(make("apex", gpu_blocks=12).worker_info),
                         arrivals).run()
    s = make("apex", gpu_blocks=12)  # big's 67 tokens at its peak fit only the CPU pool
    w = HybridWorker(s.worker_info, once(chunk_of("big")))
    result = Driver(s, w, arrivals, restore_after=3).run()
    (loss,) = w.losses
    assert "big" in loss.requeued
    retry = result.retries[0]
    assert "big" not in retry.in_flight and "big" in retry.waiting
    assert dict(result.tokens) == dict(undisturbed.tokens) == {
        rid: expected(rid, p, m) for reqs in arrivals.values() for rid, p, m in reqs}
    assert all(p.num_tokens <= 16 for p in result.ran)
    assert_all_free(s, w)


def test_a_lost_cpu_pool_leaves_an_accelerator_request_prefilling_and_runs_its_chunk_again() -> None:
    arrivals = {0: [("big", 60, 40)], 6: [("acc", 40, 4)]}
    s = make("apex", gpu_blocks=12)
    w = HybridWorker(s.worker_info, once(chunk_of("acc")))
    result = Driver(s, w, arrivals, restore_after=3).run()
    (loss,) = w.losses
    assert "big" in loss.requeued and "acc" in loss.kept
    failed = next(c for c in loss.plan.cached_requests if c.request_id == "acc")
    assert failed in result.retries[0].plan.cached_requests  # the same chunk again
    assert sum(n.request_id == "acc" for p in result.ran for n in p.new_requests) == 1, "acc was recomputed"
    assert dict(result.tokens) == {rid: expected(rid, p, m) for reqs in arrivals.values() for rid, p, m in reqs}
    assert_all_free(s, w)


def test_update_takes_no_token_of_a_chunk_short_of_its_end_and_demands_the_last_chunks() -> None:
    s = make(budget=16)
    s.add_request("a", [5] * 20, sp(4))
    plan = s.schedule()  # 16 of 20 tokens
    with pytest.raises(ValueError, match=r"has tokens of \['a'\]"):
        s.update_from_output(plan, StepOutput(plan.step_id, {"a": 11}))
    assert s.update_from_output(plan, StepOutput(plan.step_id, {})).outputs == ()
    plan = s.schedule()  # the last 4
    with pytest.raises(ValueError, match=r"lacks tokens of \['a'\]"):
        s.update_from_output(plan, StepOutput(plan.step_id, {}))
    (out,) = s.update_from_output(plan, StepOutput(plan.step_id, {"a": 11})).outputs
    assert out.new_token_ids == (11,) and out.finish_reason is None and out.num_output_tokens == 1


def test_prompts_longer_than_the_budget_are_accepted_up_to_the_context_length() -> None:
    s = make(budget=16, max_model_len=64)
    s.add_request("fits", [5] * 63, sp(1))
    with pytest.raises(InvalidArgument, match="the limit is 63") as info:
        s.add_request("over", [5] * 64, sp(1))
    assert info.value.field == "prompt"
    plans: list[StepPlan] = []
    assert run(s, HybridWorker(s.worker_info), plans) == {"fits": expected("fits", 63, 1)}
    assert chunks_of(plans, "fits") == [("new", 16), ("chunk", 16), ("chunk", 16), ("chunk", 15)]
