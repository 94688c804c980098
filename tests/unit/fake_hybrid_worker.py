"""A deterministic stand-in for a gpu_worker with a CPU pool, for the scheduler and the engine loop: it keeps each
request's state as the gpu_worker does, checks every plan against it, samples a token fixed by the request and its
position (so a run that recomputes a request yields the tokens of one that did not), gives a request that asks for
them the prompt logprobs of its prefill positions (fixed by token and position too), and can lose its CPU pool or go
away altogether."""

import asyncio
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

from queued_steps import QueuedSteps

from apex_serve.errors import CpuPoolLost, FailedPrecondition
from apex_serve.types import ExecutionMode, Placement, StepOutput, StepPlan, TokenLogprob, WorkerInfo
from scheduler_service.worker_port import GpuWorkerLost

EOS = 2


def token_for(request_id: str, position: int, eos_one_in: int = 0) -> int:
    """The token the fake samples at `position` of a request: EOS about once in eos_one_in tokens (never with 0),
    else never below 10."""
    h = zlib.crc32(f"{request_id}@{position}".encode())
    return EOS if eos_one_in and h % eos_one_in == 0 else 10 + h % 900


def prompt_logprob_for(token_id: int, position: int) -> TokenLogprob:
    """The logprob the fake gives prompt token token_id at `position` (predicted from position - 1), with a top 1."""
    return TokenLogprob(token_id, -position / 1000, ((token_id + 1, -0.5),))


@dataclass
class Held:
    token_ids: list[int]
    block_ids: list[int]
    placement: Placement
    computed: int  # tokens whose KV it holds: a prefill chunk short of the end of token_ids samples nothing
    prompt_logprobs: bool = False  # asked for them, and prefills its prompt (not a recompute)


@dataclass(frozen=True)
class Loss:
    """A step that lost the CPU pool: its plan, the requests the worker kept (accelerator-resident, not swapped), and
    those it dropped that the scheduler must recompute (CPU-resident, swapped, CPU-admitted)."""

    plan: StepPlan
    kept: frozenset[str]
    requeued: frozenset[str]


class HybridWorker:
    """execute() runs a plan; a plan with CPU work for which lose_when is true loses the CPU pool instead, as
    errors.CpuPoolLost's contract says: the worker drops the plan's admissions and swapped requests and every
    CPU-resident one, leaves the others' block growth unapplied, samples nothing and detaches the pool until
    reattach()."""

    def __init__(self, info: WorkerInfo, lose_when: Callable[[StepPlan], bool] = lambda plan: False,
                 eos_one_in: int = 0) -> None:
        self.info_now = replace(info, cpu_pool_attached=True, cpu_pool_generation=1)
        self.lose_when = lose_when
        self.eos_one_in = eos_one_in
        self.held: dict[str, Held] = {}
        self.known: dict[str, list[int]] = {}  # every token of a request the worker has seen, across drops
        self.prompt_len: dict[str, int] = {}
        self.plans: list[StepPlan] = []
        self.losses: list[Loss] = []

    def reattach(self, **changes: object) -> None:
        """A new data plane: the CPU pool attached again, with `changes` to its fields."""
        self.info_now = replace(self.info_now, cpu_pool_attached=True,
                                cpu_pool_generation=self.info_now.cpu_pool_generation + 1, **changes)

    def execute(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        for request_id in plan.freed_request_ids:
            self.held.pop(request_id, None)
        swapped = {s.request_id for s in (*plan.swap_out, *plan.swap_in)}
        prompt_logprobs: dict[str, tuple[TokenLogprob, ...]] = {}
        cpu_work = bool(swapped) or any(n.placement is Placement.CPU for n in plan.new_requests) or any(
            self._held(c.request_id).placement is Placement.CPU for c in plan.cached_requests)
        if cpu_work and not self.info_now.cpu_pool_attached:
            raise FailedPrecondition(f"step {plan.step_id} uses the CPU pool, which is not attached")
        if cpu_work and self.lose_when(plan):
            self._lose_cpu_pool(plan, swapped)
        for swap in (*plan.swap_out, *plan.swap_in):
            held = self._held(swap.request_id)
            held.placement, held.block_ids = held.placement.other, list(swap.block_ids)
        for new in plan.new_requests:
            rid = new.request_id
            assert rid not in self.held, f"step {plan.step_id}: {rid} sent in full while the worker holds it"
            known = self.known.setdefault(rid, list(new.token_ids))
            assert list(new.token_ids) == known, f"step {plan.step_id}: {rid} resumes from other tokens than it has"
            prompt = self.prompt_len.setdefault(rid, len(new.token_ids) - new.num_output_tokens)
            assert len(new.token_ids) - new.num_output_tokens == prompt, f"{rid}: its output tokens miscounted"
            asks = new.sampling.prompt_logprobs is not None and new.num_output_tokens == 0
            self.held[rid] = Held(list(new.token_ids), list(new.block_ids), new.placement, new.num_prefill_tokens,
                                  asks)
            self._prompt_logprobs(rid, 0, prompt_logprobs)
        for cached in plan.cached_requests:
            held = self._held(cached.request_id)
            held.block_ids.extend(cached.new_block_ids)
            if cached.num_scheduled_tokens:
                start = held.computed
                held.computed += cached.num_scheduled_tokens
                self._prompt_logprobs(cached.request_id, start, prompt_logprobs)
                assert held.computed <= len(held.token_ids), f"step {plan.step_id}: {cached.request_id} chunk too long"
                continue
            assert not (held.placement is Placement.CPU and plan.mode is ExecutionMode.GPU_ONLY), (
                f"step {plan.step_id}: CPU row {cached.request_id} in a GPU_ONLY step")
            assert held.computed == len(held.token_ids) - 1, f"step {plan.step_id}: {cached.request_id} decodes early"
            held.computed += 1
        self._check_blocks(plan)
        sampled = {}
        for rid in [n.request_id for n in plan.new_requests] + [c.request_id for c in plan.cached_requests]:
            held = self.held[rid]
            if held.computed < len(held.token_ids):
                continue
            token = token_for(rid, len(held.token_ids), self.eos_one_in)
            held.token_ids.append(token)
            self.known[rid].append(token)
            sampled[rid] = token
        return StepOutput(plan.step_id, sampled, prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs(self, request_id: str, start: int, out: dict[str, tuple[TokenLogprob, ...]]) -> None:
        """A request that asks for them: the prompt logprobs of its chunk from start to its computed tokens."""
        held = self.held[request_id]
        end = min(held.computed, self.prompt_len[request_id] - 1)
        if held.prompt_logprobs and end > start:
            out[request_id] = tuple(prompt_logprob_for(held.token_ids[i], i) for i in range(start + 1, end + 1))

    def _lose_cpu_pool(self, plan: StepPlan, swapped: set[str]) -> None:
        dropped = {rid for rid, held in self.held.items() if rid in swapped or held.placement is Placement.CPU}
        for rid in dropped:
            del self.held[rid]
        cpu_admitted = {n.request_id for n in plan.new_requests if n.placement is Placement.CPU}
        self.losses.append(Loss(plan, frozenset(self.held), frozenset(dropped | cpu_admitted)))
        self.info_now = replace(self.info_now, cpu_pool_attached=False)
        raise CpuPoolLost(f"step {plan.step_id}: the cpu_attention_worker missed its deadline")

    def _held(self, request_id: str) -> Held:
        assert request_id in self.held, f"{request_id} is not held by the worker"
        return self.held[request_id]

    def _check_blocks(self, plan: StepPlan) -> None:
        """Each held request has the blocks of its cached tokens and, if the plan runs it, of its next one, in its
        pool's range; no block is held twice."""
        block_size = self.info_now.block_size
        pool_blocks = {Placement.GPU: self.info_now.num_kv_blocks, Placement.CPU: self.info_now.num_cpu_kv_blocks}
        scheduled = {r.request_id for r in (*plan.new_requests, *plan.cached_requests)}
        holders: dict[tuple[Placement, int], list[str]] = defaultdict(list)
        for rid, held in self.held.items():
            positions = len(held.token_ids) if rid in scheduled else len(held.token_ids) - 1
            needed = -(-positions // block_size)
            assert len(held.block_ids) >= needed, f"step {plan.step_id}: {rid} lacks blocks"
            for block in held.block_ids[:needed]:
                assert 0 <= block < pool_blocks[held.placement], f"step {plan.step_id}: {rid} has block {block}"
                holders[(held.placement, block)].append(rid)
        shared = {key: rids for key, rids in holders.items() if len(rids) > 1}
        assert not shared, f"step {plan.step_id}: blocks held twice: {shared}"


class AsyncHybridWorker(QueuedSteps, HybridWorker):
    """The engine loop's worker port of the fake: away (GpuWorkerLost on every call) while `gone`."""

    def __init__(self, info: WorkerInfo, lose_when: Callable[[StepPlan], bool] = lambda plan: False) -> None:
        super().__init__(info, lose_when)
        self.gone = False
        self.resets = 0

    async def step(self, plan: StepPlan) -> StepOutput:
        await asyncio.sleep(0)  # a step takes a while: the event loop runs meanwhile
        self._answer()
        return self.execute(plan)

    async def info(self) -> WorkerInfo:
        self._answer()
        return self.info_now

    async def reset(self) -> int:
        self._answer()
        self.resets += 1
        dropped = len(self.held)
        self.held.clear()
        return dropped

    def _answer(self) -> None:
        if self.gone:
            raise GpuWorkerLost("gpu_worker at unix:///fake: connection refused")
