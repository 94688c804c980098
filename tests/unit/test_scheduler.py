"""Scheduler (gpu-only policy) driven by a fake worker that applies plans strictly and samples scripted tokens."""

import random
from collections.abc import Callable

import pytest

from apex_serve.errors import InvalidArgument, ResourceExhausted
from apex_serve.types import (
    FinishReason,
    Placement,
    RequestOutput,
    SamplingParams,
    StepOutput,
    StepPlan,
    WorkerInfo,
)
from scheduler_service.config import SchedulerConfig
from scheduler_service.scheduler import Scheduler

BLOCK = 4
VOCAB = 50
EOS = 0
TOKEN = 7  # what the fake worker samples unless told otherwise: never a stop token

TokenFn = Callable[[str, int], int]  # (request_id, position of the new token) -> token


def make(num_blocks: int = 64, max_model_len: int = 256, **config: int) -> Scheduler:
    info = WorkerInfo("fake", 1, VOCAB, max_model_len, (EOS,), BLOCK, num_blocks, "cpu", "float32")
    return Scheduler(SchedulerConfig(**config), info)  # type: ignore[arg-type]


def sp(max_tokens: int = 16, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


class FakeWorker:
    """Holds per-request state as gpu_worker does, asserting that every plan is exactly right."""

    def __init__(self, sched: Scheduler, token_fn: TokenFn = lambda rid, pos: TOKEN) -> None:
        self.max_model_len = sched.limits.max_model_len
        self.max_num_batched_tokens = sched.config.max_num_batched_tokens
        self.token_fn = token_fn
        self.held: dict[str, tuple[list[int], list[int]]] = {}  # id -> (token ids, block ids)
        self.computed: dict[str, int] = {}  # id -> tokens whose KV it holds
        self.sampled: dict[str, list[int]] = {}  # every token sampled per id, across preemptions

    def execute(self, plan: StepPlan) -> StepOutput:
        for rid in plan.freed_request_ids:
            assert rid in self.held, f"step {plan.step_id} frees {rid!r}, which the worker does not hold"
            del self.held[rid]
            del self.computed[rid]
        for new in plan.new_requests:
            assert new.request_id not in self.held, f"{new.request_id!r} sent in full twice"
            assert 0 <= new.num_output_tokens < len(new.token_ids)
            assert 0 <= new.num_scheduled_tokens <= len(new.token_ids)
            self.held[new.request_id] = (list(new.token_ids), list(new.block_ids))
            self.computed[new.request_id] = new.num_prefill_tokens
        for cached in plan.cached_requests:
            rid = cached.request_id
            assert rid in self.held, f"delta for {rid!r} before its full request"
            self.held[rid][1].extend(cached.new_block_ids)
            tokens = len(self.held[rid][0])
            if cached.num_scheduled_tokens:
                assert self.computed[rid] + cached.num_scheduled_tokens <= tokens, f"{rid}: a chunk past its tokens"
                self.computed[rid] += cached.num_scheduled_tokens
            else:
                assert self.computed[rid] == tokens - 1, f"{rid}: a decode row before its prefill's end"
                self.computed[rid] = tokens
        scheduled = [r.request_id for r in plan.new_requests] + [r.request_id for r in plan.cached_requests]
        assert len(scheduled) == len(set(scheduled)), "a request scheduled twice in one step"
        assert set(scheduled) == set(self.held), "worker holds state of a request that is not running"
        all_blocks = [b for _, blocks in self.held.values() for b in blocks]
        assert len(all_blocks) == len(set(all_blocks)), "two requests share a KV block"
        for tokens, blocks in self.held.values():
            assert len(tokens) - 1 < self.max_model_len
            assert len(blocks) == (len(tokens) - 1) // BLOCK + 1, "blocks do not match the position written"
        assert plan.num_tokens <= self.max_num_batched_tokens, f"step {plan.step_id} is over the token budget"
        sampled = {}
        for rid in scheduled:
            tokens = self.held[rid][0]
            if self.computed[rid] < len(tokens):  # a chunk short of the end of its tokens samples nothing
                continue
            sampled[rid] = self.token_fn(rid, len(tokens))
            tokens.append(sampled[rid])
            self.sampled.setdefault(rid, []).append(sampled[rid])
        return StepOutput(step_id=plan.step_id, sampled=sampled)


def assert_blocks_conserved(sched: Scheduler) -> None:
    held = [b for r in sched._requests.values() for b in r.block_ids]
    assert len(held) == len(set(held)), "a block is held by two requests"
    stats = sched.stats()
    assert stats.free_blocks[Placement.GPU] + len(held) == stats.total_blocks[Placement.GPU], "KV blocks leaked"


def all_blocks_free(sched: Scheduler) -> bool:
    stats = sched.stats()
    return stats.free_blocks[Placement.GPU] == stats.total_blocks[Placement.GPU]


def step(sched: Scheduler, worker: FakeWorker) -> tuple[StepPlan, tuple[RequestOutput, ...]]:
    plan = sched.schedule()
    outputs = sched.update_from_output(plan, worker.execute(plan)).outputs
    assert_blocks_conserved(sched)
    return plan, outputs


def drain(
    sched: Scheduler, worker: FakeWorker, plans: list[StepPlan] | None = None, max_steps: int = 10_000
) -> dict[str, list[RequestOutput]]:
    """Step until no work is left; the outputs per request, and every plan appended to plans."""
    streams: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return streams
        plan, outputs = step(sched, worker)
        if plans is not None:
            plans.append(plan)
        for out in outputs:
            assert not streams.get(out.request_id) or not streams[out.request_id][-1].finished
            streams.setdefault(out.request_id, []).append(out)
    raise AssertionError(f"work left after {max_steps} steps")


def tokens_of(stream: list[RequestOutput]) -> list[int]:
    return [t for out in stream for t in out.new_token_ids]


# --- config and validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_num_seqs", {"max_num_seqs": 0}),
        ("max_num_batched_tokens", {"max_num_seqs": 64, "max_num_batched_tokens": 63}),
        ("policy", {"policy": "vllm"}),
        ("max_sit_out", {"max_sit_out": -1}),
        ("tpot_slo_ms", {"tpot_slo_ms": -1.0}),
        ("ttft_slo_ms", {"ttft_slo_ms": -1.0}),
        ("address", {"address": ""}),
        ("worker_address", {"worker_address": ""}),
        ("max_queued_requests", {"max_queued_requests": 0}),
    ],
)
def test_config_rejects_bad_value_naming_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_are_valid() -> None:
    assert SchedulerConfig().policy == "gpu-only"


@pytest.mark.parametrize(
    ("field", "prompt", "max_tokens", "max_model_len", "num_blocks"),
    [
        ("prompt", [], 1, 256, 64),  # empty
        ("prompt", [1, VOCAB], 1, 256, 64),  # token outside the vocabulary
        ("prompt", [-1], 1, 256, 64),
        ("prompt", [1] * 12, 1, 12, 64),  # leaves no room for output in the context
        ("prompt", [1] * 17, 1, 256, 4),  # more KV than the whole pool (4 blocks of 4)
        ("max_tokens", [1] * 10, 8, 256, 4),  # the prompt fits the pool, prompt + outputs never can
    ],
)
def test_add_request_rejects_what_can_never_run(
    field: str, prompt: list[int], max_tokens: int, max_model_len: int, num_blocks: int
) -> None:
    sched = make(num_blocks=num_blocks, max_model_len=max_model_len, max_num_seqs=4, max_num_batched_tokens=24)
    with pytest.raises(InvalidArgument) as info:
        sched.add_request("r", prompt, sp(max_tokens))
    assert info.value.field == field
    assert sched.stats().num_waiting == 0


def test_add_request_accepts_requests_at_the_limits() -> None:
    sched = make(num_blocks=4, max_model_len=17, max_num_seqs=4, max_num_batched_tokens=16)
    sched.add_request("fills-pool", [1] * 10, sp(7))  # KV for 16 tokens = the pool
    sched.add_request("capped-by-context", [1] * 16, sp(1000))  # stops at max_model_len, within the pool
    assert sched.stats().num_waiting == 2


def test_add_request_rejects_duplicate_id_until_it_finishes() -> None:
    sched = make()
    sched.add_request("a", [1], sp(1))
    with pytest.raises(InvalidArgument) as info:
        sched.add_request("a", [2], sp(1))
    assert info.value.field == "request_id"
    drain(sched, FakeWorker(sched))
    sched.add_request("a", [2], sp(1))


def test_add_request_raises_resource_exhausted_when_queue_is_full() -> None:
    sched = make(max_queued_requests=2)
    sched.add_request("a", [1], sp())
    sched.add_request("b", [1], sp())
    with pytest.raises(ResourceExhausted, match="max_queued_requests"):
        sched.add_request("c", [1], sp())
    sched.schedule()  # both admitted: the queue has room again
    sched.add_request("c", [1], sp())


# --- plans -------------------------------------------------------------------------------------


def test_first_plan_carries_the_prompt_in_full_with_all_its_blocks() -> None:
    sched = make()
    sched.add_request("a", list(range(1, 10)), sp(temperature=0.0))
    plan = sched.schedule()
    (new,) = plan.new_requests
    assert new.token_ids == tuple(range(1, 10))
    assert len(new.block_ids) == 3 and new.num_output_tokens == 0
    assert new.sampling == sp(temperature=0.0)
    assert plan.cached_requests == () and plan.freed_request_ids == ()


def test_decode_steps_send_only_new_block_ids_at_block_boundaries() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1, 2, 3], sp(10))
    step(sched, worker)  # prefill positions 0..2, one block
    deltas = [step(sched, worker)[0].cached_requests[0].new_block_ids for _ in range(9)]
    # decode positions 3..11: a new block when writing position 4 and 8
    assert [len(d) for d in deltas] == [0, 1, 0, 0, 0, 1, 0, 0, 0]


def test_fcfs_admission_stops_at_first_request_that_does_not_fit() -> None:
    sched = make(num_blocks=4)
    sched.add_request("a", [1] * 8, sp(4))  # 2 blocks
    sched.add_request("b", [1] * 12, sp(4))  # 3 blocks: does not fit beside a
    sched.add_request("c", [1] * 2, sp(4))  # would fit, but must not overtake b
    plan = sched.schedule()
    assert [r.request_id for r in plan.new_requests] == ["a"]
    assert sched.stats().num_waiting == 2


def test_admission_respects_max_num_seqs() -> None:
    sched = make(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(rid, [1], sp())
    assert [r.request_id for r in sched.schedule().new_requests] == ["a", "b"]


def test_new_requests_join_while_others_decode_within_the_token_budget() -> None:
    sched = make(max_num_seqs=4, max_num_batched_tokens=10)
    worker = FakeWorker(sched)
    sched.add_request("a", [1] * 6, sp())
    sched.add_request("b", [1] * 6, sp())
    plan, outputs = step(sched, worker)
    # a whole, b the 4 tokens the budget of 10 leaves; b samples nothing yet
    assert [(r.request_id, r.num_scheduled_tokens) for r in plan.new_requests] == [("a", 0), ("b", 4)]
    assert [o.request_id for o in outputs] == ["a"]
    sched.add_request("c", [1] * 4, sp())
    plan, outputs = step(sched, worker)
    # a decodes (1), b's last 2 tokens, c whole (4): 7 of 10
    assert [(r.request_id, r.num_scheduled_tokens) for r in plan.cached_requests] == [("a", 0), ("b", 2)]
    assert [(r.request_id, r.num_scheduled_tokens) for r in plan.new_requests] == [("c", 0)]
    assert {o.request_id for o in outputs} == {"a", "b", "c"}
    plan, outputs = step(sched, worker)
    assert [(r.request_id, r.num_scheduled_tokens) for r in plan.cached_requests] == [("a", 0), ("b", 0), ("c", 0)]
    assert sched.stats().num_running == 3 and sched.stats().num_steps == 3


# --- finishing ---------------------------------------------------------------------------------


def run_one(
    sampling: SamplingParams, tokens: list[int], prompt_len: int = 3, max_model_len: int = 256
) -> list[RequestOutput]:
    """Run one request whose worker samples the scripted tokens; its outputs."""
    sched = make(max_model_len=max_model_len)
    script = iter(tokens)
    worker = FakeWorker(sched, lambda rid, pos: next(script))
    sched.add_request("a", [1] * prompt_len, sampling)
    stream = drain(sched, worker)["a"]
    assert all_blocks_free(sched) and not worker.held
    return stream


def test_eos_finishes_with_stop_and_reports_counts() -> None:
    stream = run_one(sp(10), [5, 6, EOS, 9])
    assert tokens_of(stream) == [5, 6, EOS]
    assert [o.finished for o in stream] == [False, False, True]
    assert stream[-1].finish_reason is FinishReason.STOP
    assert (stream[-1].num_prompt_tokens, stream[-1].num_output_tokens) == (3, 3)


def test_eos_is_ignored_with_ignore_eos() -> None:
    stream = run_one(sp(4, ignore_eos=True), [EOS] * 4)
    assert len(stream) == 4 and stream[-1].finish_reason is FinishReason.LENGTH


def test_stop_token_id_finishes_with_stop_even_with_ignore_eos() -> None:
    stream = run_one(sp(10, stop_token_ids=(9,), ignore_eos=True), [EOS, 9, 5])
    assert tokens_of(stream) == [EOS, 9] and stream[-1].finish_reason is FinishReason.STOP


def test_max_tokens_finishes_with_length_after_exactly_max_tokens() -> None:
    stream = run_one(sp(5), [5] * 10)
    assert len(stream) == 5 and stream[-1].finish_reason is FinishReason.LENGTH
    assert [o.num_output_tokens for o in stream] == [1, 2, 3, 4, 5]


def test_max_model_len_finishes_with_length_when_sequence_fills_the_context() -> None:
    stream = run_one(sp(100), [5] * 10, prompt_len=5, max_model_len=8)
    assert len(stream) == 3 and stream[-1].finish_reason is FinishReason.LENGTH


def test_eos_as_last_allowed_token_reports_stop() -> None:
    assert run_one(sp(2), [5, EOS])[-1].finish_reason is FinishReason.STOP


def test_finished_request_is_freed_on_the_worker_in_the_next_plan_once() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1], sp(1))
    sched.add_request("b", [1], sp(3))
    _, outputs = step(sched, worker)
    assert [o.request_id for o in outputs if o.finished] == ["a"]
    assert sched.schedule().freed_request_ids == ("a",)


# --- preemption --------------------------------------------------------------------------------


def test_preemption_evicts_youngest_first_and_requeues_at_the_front() -> None:
    sched = make(num_blocks=3)
    worker = FakeWorker(sched)
    for rid in "abc":
        sched.add_request(rid, [1, 2, 3, 4], sp(5))  # 1 block each: the pool is full
    step(sched, worker)
    sched.add_request("d", [1], sp(1))
    plan = sched.schedule()  # every request must write position 4, in a new block
    # a takes c's block; b, the youngest left, preempts itself
    assert [r.request_id for r in plan.cached_requests] == ["a"]
    assert plan.freed_request_ids == ("c", "b") and plan.new_requests == ()
    assert sched.stats().num_preemptions == 2 and sched.stats().num_waiting == 3
    sched.update_from_output(plan, worker.execute(plan))
    plans: list[StepPlan] = []
    drain(sched, worker, plans)
    assert [r.request_id for p in plans for r in p.new_requests] == ["b", "c", "d"]
    assert {rid: len(tokens) for rid, tokens in worker.sampled.items()} == {"a": 5, "b": 5, "c": 5, "d": 1}


def test_preempted_request_is_resent_with_prompt_outputs_and_output_count() -> None:
    sched = make(num_blocks=2)
    worker = FakeWorker(sched, lambda rid, pos: 10 + pos)
    sched.add_request("a", [1, 2, 3], sp(5))
    sched.add_request("b", [4, 5, 6, 7], sp(4))
    step(sched, worker)  # a: 4 tokens, b: 5 tokens
    plan, _ = step(sched, worker)  # b must write position 4: it preempts itself
    assert plan.freed_request_ids == ("b",)
    for _ in range(10):  # a finishes within its 5 tokens, then b is re-admitted
        plan, _ = step(sched, worker)
        resent = [r for r in plan.new_requests if r.request_id == "b"]
        if resent:
            break
    else:
        pytest.fail("the preempted request was never re-admitted")
    assert resent[0].token_ids == (4, 5, 6, 7, 14)
    assert resent[0].num_output_tokens == 1
    assert len(resent[0].block_ids) == 2


def test_resumed_request_longer_than_token_budget_recomputes_in_chunks() -> None:
    sched = make(num_blocks=3, max_num_seqs=2, max_num_batched_tokens=6)
    worker = FakeWorker(sched)
    sched.add_request("a", [1], sp(11))
    sched.add_request("b", [1] * 5, sp(7))
    plans: list[StepPlan] = []
    streams = drain(sched, worker, plans)
    assert sched.stats().num_preemptions == 1  # a's position 4 needs b's blocks; b resumes with 9 tokens
    (i,) = [i for i, p in enumerate(plans) if any(r.num_output_tokens for r in p.new_requests)]
    (resume,) = plans[i].new_requests
    assert len(resume.token_ids) == 9 and resume.num_scheduled_tokens == 6 and plans[i].cached_requests == ()
    assert [(c.request_id, c.num_scheduled_tokens) for c in plans[i + 1].cached_requests] == [("b", 3)]
    assert [len(tokens_of(streams[r])) for r in "ab"] == [11, 7]


def test_tiny_pool_completes_every_request_with_exactly_max_tokens() -> None:
    sched = make(num_blocks=6, max_num_seqs=8)
    worker = FakeWorker(sched, lambda rid, pos: (int(rid[1:]) * 3 + pos) % (VOCAB - 1) + 1)
    rng = random.Random(7)
    expected = {}
    for i in range(12):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 8))]
        max_tokens = rng.randint(1, 25 - len(prompt))
        sched.add_request(f"r{i}", prompt, sp(max_tokens))
        expected[f"r{i}"] = [(i * 3 + len(prompt) + k) % (VOCAB - 1) + 1 for k in range(max_tokens)]
    streams = drain(sched, worker)
    assert sched.stats().num_preemptions > 0
    assert {rid: tokens_of(s) for rid, s in streams.items()} == expected
    assert all(s[-1].finish_reason is FinishReason.LENGTH for s in streams.values())
    assert not worker.held and all_blocks_free(sched)


# --- abort -------------------------------------------------------------------------------------


def test_abort_mid_flight_frees_blocks_at_once_and_drops_its_token() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1] * 9, sp())
    sched.add_request("b", [1] * 4, sp())
    plan = sched.schedule()
    free = sched.stats().free_blocks[Placement.GPU]
    assert sched.abort("a")
    assert sched.stats().free_blocks[Placement.GPU] == free + 3 and sched.stats().num_running == 1
    outputs = sched.update_from_output(plan, worker.execute(plan)).outputs
    assert [o.request_id for o in outputs] == ["b"]
    assert sched.schedule().freed_request_ids == ("a",)


def test_a_token_of_a_request_the_plan_never_ran_is_refused_beside_an_aborted_ones() -> None:
    sched = make()
    sched.add_request("a", [1] * 9, sp())
    sched.add_request("b", [1] * 4, sp())
    plan = sched.schedule()
    assert sched.abort("a")
    with pytest.raises(ValueError, match=r"has tokens of \['x'\]"):  # as many tokens as the plan ran requests
        sched.update_from_output(plan, StepOutput(plan.step_id, {"b": TOKEN, "x": TOKEN}))
    with pytest.raises(ValueError, match=r"lacks tokens of \['b'\]"):
        sched.update_from_output(plan, StepOutput(plan.step_id, {"a": TOKEN}))
    outputs = sched.update_from_output(plan, StepOutput(plan.step_id, {"a": TOKEN, "b": TOKEN})).outputs
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("b", (TOKEN,))]


def test_abort_returns_false_for_unknown_repeated_or_finished_requests() -> None:
    sched = make()
    sched.add_request("a", [1], sp(1))
    sched.add_request("b", [1], sp())
    assert not sched.abort("nope")
    outputs = step(sched, FakeWorker(sched))[1]
    assert [o.request_id for o in outputs if o.finished] == ["a"]
    assert not sched.abort("a")
    assert sched.abort("b") and not sched.abort("b")


def test_abort_of_a_request_never_sent_frees_nothing_on_the_worker() -> None:
    sched = make()
    sched.add_request("a", [1], sp())
    assert sched.abort("a")
    assert not sched.has_work()
    assert sched.schedule() == StepPlan(step_id=0)
    assert sched.stats().num_steps == 0


def test_id_reused_after_abort_mid_flight_does_not_get_the_old_token() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1, 2], sp())
    plan = sched.schedule()
    sched.abort("a")
    sched.add_request("a", [3, 4, 5], sp())
    assert sched.update_from_output(plan, worker.execute(plan)).outputs == ()
    plan, _ = step(sched, worker)
    assert plan.freed_request_ids == ("a",)
    assert plan.new_requests[0].token_ids == (3, 4, 5)


def test_failed_step_recovers_after_its_requests_are_aborted() -> None:
    sched = make()
    sched.add_request("a", [1], sp())
    sched.add_request("b", [1], sp())
    failed = sched.schedule()
    sched.add_request("c", [1], sp())
    for r in failed.new_requests:  # what the engine loop does when a Step fails
        sched.abort(r.request_id)
    plan = sched.schedule()
    assert plan.freed_request_ids == ("a", "b")
    assert [r.request_id for r in plan.new_requests] == ["c"]
    assert_blocks_conserved(sched)


# --- misuse ------------------------------------------------------------------------------------


def test_a_plan_may_be_made_ahead_of_one_in_flight_but_not_of_two() -> None:
    sched = make()
    sched.add_request("a", [1], sp())
    assert not sched.schedule().planned_ahead
    assert sched.schedule().planned_ahead
    with pytest.raises(RuntimeError, match="in flight"):
        sched.schedule()


def test_update_with_a_stale_plan_raises() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1], sp())
    plan, _ = step(sched, worker)
    with pytest.raises(ValueError, match="step_id"):
        sched.update_from_output(plan, StepOutput(plan.step_id, {"a": 1}))


def test_update_with_a_token_of_an_unplanned_request_raises() -> None:
    sched = make()
    sched.add_request("a", [1], sp())
    plan = sched.schedule()
    with pytest.raises(ValueError, match="sampled"):
        sched.update_from_output(plan, StepOutput(plan.step_id, {"a": 1, "x": 2}))


def test_update_missing_a_token_raises_without_changing_state() -> None:
    sched = make()
    sched.add_request("a", [1], sp())
    sched.add_request("b", [1], sp())
    plan = sched.schedule()
    with pytest.raises(ValueError, match="sampled"):
        sched.update_from_output(plan, StepOutput(plan.step_id, {"a": 1}))
    assert len(sched.update_from_output(plan, StepOutput(plan.step_id, {"a": 1, "b": 2})).outputs) == 2


# --- property ----------------------------------------------------------------------------------


def test_random_add_schedule_update_abort_never_leaks_blocks() -> None:
    rng = random.Random(20240611)
    sched = make(num_blocks=12, max_model_len=40, max_num_seqs=6, max_num_batched_tokens=32, max_queued_requests=20)
    worker = FakeWorker(sched, lambda rid, pos: rng.choice([EOS] + [5] * 30 + list(range(1, VOCAB))))
    added: dict[str, SamplingParams] = {}
    aborted: set[str] = set()
    streams: dict[str, list[RequestOutput]] = {}
    for i in range(4000):
        if rng.random() < 0.3:
            sampling = sp(rng.randint(1, 30), stop_token_ids=(9,) * rng.randint(0, 1), ignore_eos=rng.random() < 0.3)
            try:
                sched.add_request(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 36))], sampling)
                added[f"r{i}"] = sampling
            except (InvalidArgument, ResourceExhausted):
                pass
        if added and rng.random() < 0.05 and sched.abort(victim := rng.choice(list(added))):
            aborted.add(victim)
        assert_blocks_conserved(sched)
        plan = sched.schedule()
        if added and rng.random() < 0.05 and sched.abort(victim := rng.choice(list(added))):
            aborted.add(victim)  # mid-flight
        assert_blocks_conserved(sched)
        for out in sched.update_from_output(plan, worker.execute(plan)).outputs:
            assert out.request_id not in aborted
            streams.setdefault(out.request_id, []).append(out)
        assert_blocks_conserved(sched)
    for rid, out in [(rid, o) for rid, s in drain(sched, worker).items() for o in s]:
        streams.setdefault(rid, []).append(out)
    assert not worker.held and all_blocks_free(sched)
    assert sched.stats().num_preemptions > 0 and len(aborted) > 0
    for rid, sampling in added.items():
        stream = streams.get(rid, [])
        if rid in aborted:
            assert not stream or not stream[-1].finished
            continue
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        tokens = tokens_of(stream)
        if stream[-1].finish_reason is FinishReason.LENGTH:
            assert len(tokens) == sampling.max_tokens or stream[-1].num_prompt_tokens + len(tokens) == 40
        else:
            assert tokens[-1] in sampling.stop_token_ids or (tokens[-1] == EOS and not sampling.ignore_eos)


@pytest.mark.parametrize(("every", "sampled"), [(3, [0, 3, 6]), (0, [])])
def test_every_nth_plan_that_runs_requests_asks_for_subtask_intervals(every: int, sampled: list[int]) -> None:
    sched = make(sample_layers_every=every)
    sched.add_request("a", [1, 2], sp(8))
    plans: list[StepPlan] = []
    drain(sched, FakeWorker(sched), plans)
    assert [p.step_id for p in plans if p.record_subtasks] == sampled
    assert not plans[-1].record_subtasks and plans[-1].is_empty  # the plan that only frees "a"


def test_update_returns_the_plans_iteration_record() -> None:
    sched = make()
    worker = FakeWorker(sched)
    sched.add_request("a", [1, 2], sp())
    plan = sched.schedule()
    result = sched.update_from_output(plan, worker.execute(plan))
    assert result.record is not None and result.record.step_id == plan.step_id and result.record.num_prefills == 1
    assert sched.stats().last_iteration is result.record and sched.in_flight is None
