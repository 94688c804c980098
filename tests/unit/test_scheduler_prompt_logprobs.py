"""Prompt logprobs through the scheduler, on the fake hybrid worker: a request that asks gets those of every prompt
token after the first on its first output, whether its prefill ran whole or in chunks; never again after a
preemption's recompute, and exactly once after a lost CPU pool restarted its prefill; a step that ends a prefill
without them is refused; a request that did not ask gets none."""

from dataclasses import replace

import pytest
from fake_hybrid_worker import HybridWorker, prompt_logprob_for
from test_scheduler_chunking import chunk_of, make
from test_scheduler_cpu_loss import once

from apex_serve.errors import CpuPoolLost
from apex_serve.types import RequestOutput, SamplingParams, StepOutput
from scheduler_service.scheduler import Scheduler

ASKS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=1)

Arrivals = dict[int, list[tuple[str, int, SamplingParams]]]  # iteration -> (request id, prompt tokens, sampling)


def prompt(length: int) -> list[int]:
    return [10 + i % 50 for i in range(length)]


def drive(s: Scheduler, w: HybridWorker, arrivals: Arrivals, restore_after: int = 3) -> dict[str, list[RequestOutput]]:
    """Every output per request until no work is left; a plan that loses the CPU pool is followed by the scheduler's
    retry, and the pool comes back restore_after iterations later."""
    outputs: dict[str, list[RequestOutput]] = {}
    iteration, restore_at = 0, None
    while s.has_work() or iteration <= max(arrivals):
        for request_id, length, sampling in arrivals.get(iteration, ()):
            s.add_request(request_id, prompt(length), sampling)
        if iteration == restore_at:
            w.reattach()
            s.cpu_pool_restored(w.info_now)
        plan = s.schedule()
        try:
            output = w.execute(plan)
        except CpuPoolLost:
            plan = s.cpu_pool_lost(plan)
            output = w.execute(plan)
            restore_at = iteration + restore_after
        for out in s.update_from_output(plan, output).outputs:
            outputs.setdefault(out.request_id, []).append(out)
        iteration += 1
        assert iteration < 2000, "work left after 2000 iterations"
    return outputs


def assert_once_on_the_first_output(outputs: list[RequestOutput], length: int) -> None:
    tokens = prompt(length)
    assert outputs[0].prompt_logprobs == tuple(prompt_logprob_for(tokens[i], i) for i in range(1, length))
    assert all(out.prompt_logprobs == () for out in outputs[1:]), "prompt logprobs sent again"


@pytest.mark.parametrize("policy", ["gpu-only", "apex"])
def test_the_first_output_carries_the_prompt_logprobs_of_a_chunked_or_whole_prefill(policy: str) -> None:
    s = make(policy, budget=16)
    w = HybridWorker(s.worker_info)
    arrivals = {0: [("chunked", 50, ASKS), ("quiet", 9, replace(ASKS, prompt_logprobs=None))], 2: [("whole", 7, ASKS)]}
    outputs = drive(s, w, arrivals)
    assert sum(len(p.cached_requests) for p in w.plans) > 0
    assert_once_on_the_first_output(outputs["chunked"], 50)
    assert_once_on_the_first_output(outputs["whole"], 7)
    assert all(out.prompt_logprobs == () for out in outputs["quiet"]), "a request that did not ask got them"
    assert all(len(out) == 6 for out in outputs.values())


def test_a_preempted_request_recomputed_does_not_repeat_its_prompt_logprobs() -> None:
    s = make("gpu-only", gpu_blocks=12, budget=8, max_num_seqs=4)
    w = HybridWorker(s.worker_info)
    arrivals = {0: [("a", 12, replace(ASKS, max_tokens=30)), ("b", 12, replace(ASKS, max_tokens=30))]}
    outputs = drive(s, w, arrivals)
    recomputed = {n.request_id for p in w.plans for n in p.new_requests if n.num_output_tokens > 0}
    assert recomputed, "no request was preempted and recomputed"
    for rid in ("a", "b"):
        assert_once_on_the_first_output(outputs[rid], 12)


def test_a_lost_cpu_pool_restarting_a_prefill_delivers_its_prompt_logprobs_once() -> None:
    s = make("apex", gpu_blocks=12)  # big's 67 tokens at its peak fit only the CPU pool
    w = HybridWorker(s.worker_info, once(chunk_of("big")))  # lost after big's first chunk gave prompt logprobs
    outputs = drive(s, w, {0: [("big", 60, replace(ASKS, max_tokens=7)), ("s", 6, ASKS)]})
    (loss,) = w.losses
    assert "big" in loss.requeued
    assert_once_on_the_first_output(outputs["big"], 60)
    assert_once_on_the_first_output(outputs["s"], 6)


def test_a_step_ending_a_prefill_without_its_prompt_logprobs_is_refused() -> None:
    s = make(budget=16)
    s.add_request("a", prompt(20), ASKS)
    plan = s.schedule()  # 16 of 20 tokens
    s.update_from_output(plan, StepOutput(plan.step_id, {}, prompt_logprobs={
        "a": tuple(prompt_logprob_for(t, i) for i, t in enumerate(prompt(20)[1:16], start=1))}))
    plan = s.schedule()  # the last 4: prompt tokens 16 .. 19
    with pytest.raises(ValueError, match=r"prompt_logprobs: .*\['a'\]"):
        s.update_from_output(plan, StepOutput(plan.step_id, {"a": 11}))


def test_prompt_logprobs_of_a_request_aborted_mid_prefill_are_dropped_with_it() -> None:
    s = make(budget=16)
    w = HybridWorker(s.worker_info)
    s.add_request("a", prompt(40), ASKS)
    plan = s.schedule()
    assert s.abort("a")
    assert s.update_from_output(plan, w.execute(plan)).outputs == ()
    s.add_request("a", prompt(40), ASKS)  # the id again: a new request, whose prefill starts afresh
    outputs = drive(s, w, {0: []})
    assert_once_on_the_first_output(outputs["a"], 40)
