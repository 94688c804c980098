"""A scheduler stand-in for the hybrid benchmark and tests: two block pools (accelerator and CPU), placements,
sub-batches, swaps, one greedy StepPlan per step against a ModelRunner."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from apex_serve.types import (
    CachedRequestData,
    ExecutionMode,
    NewRequestData,
    Placement,
    SamplingParams,
    StepOutput,
    StepPlan,
    SwapData,
    WorkerInfo,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)


@dataclass
class Tracked:
    prompt: list[int]
    placement: Placement
    sub_batch: int = 0
    blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.outputs)


class StepRunner(Protocol):
    """A ModelRunner, or a gpu_worker process behind gRPC."""

    @property
    def info(self) -> WorkerInfo: ...

    def execute(self, plan: StepPlan) -> StepOutput: ...


class ScriptedScheduler:
    """Plays the scheduler over both pools with shuffled block ids."""

    def __init__(self, runner: StepRunner, seed: int = 0) -> None:
        self.runner = runner
        self.block_size = runner.info.block_size
        rng = random.Random(seed)
        self.free: dict[Placement, list[int]] = {
            Placement.GPU: rng.sample(range(runner.info.num_kv_blocks), runner.info.num_kv_blocks),
            Placement.CPU: rng.sample(range(runner.info.num_cpu_kv_blocks), runner.info.num_cpu_kv_blocks),
        }
        self.requests: dict[str, Tracked] = {}
        self._freed: list[str] = []
        self.step_id = 0
        self.outputs: list[StepOutput] = []

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self, placement: Placement, count: int) -> list[int]:
        pool = self.free[placement]
        if len(pool) < count:
            raise RuntimeError(f"the {placement.value} pool ran out of blocks")
        return [pool.pop() for _ in range(count)]

    def add(self, rid: str, prompt: list[int], placement: Placement, sub_batch: int = 0) -> None:
        self.requests[rid] = Tracked(prompt, placement, sub_batch)

    def finish(self, rid: str) -> None:
        """Drop a request: its blocks go back to its pool, and the next plan frees it on the worker."""
        request = self.requests.pop(rid)
        self.free[request.placement].extend(request.blocks)
        self._freed.append(rid)

    def step(
        self,
        mode: ExecutionMode,
        swap_out: tuple[str, ...] = (),
        swap_in: tuple[str, ...] = (),
        sub_batch_of: Callable[[str], int] | None = None,
    ) -> StepOutput:
        """One step: swaps first, then every tracked request (prefill of the new, one decode of the others)."""
        return self.run(self.plan(mode, swap_out, swap_in, sub_batch_of))

    def plan(
        self,
        mode: ExecutionMode,
        swap_out: tuple[str, ...] = (),
        swap_in: tuple[str, ...] = (),
        sub_batch_of: Callable[[str], int] | None = None,
        swap_in_first: bool = True,
    ) -> StepPlan:
        """The next step's plan (blocks taken, swaps applied to the bookkeeping); run() executes it. Swaps take
        their blocks in the order given by swap_in_first (ins first, as the scheduler does, lets a swap out take
        the CPU blocks a swap in just left; outs first lets a swap in take the accelerator's)."""
        swaps: dict[str, list[SwapData]] = {"out": [], "in": []}
        order = (("in", swap_in), ("out", swap_out)) if swap_in_first else (("out", swap_out), ("in", swap_in))
        for kind, rids in order:
            for rid in rids:
                request = self.requests[rid]
                blocks = self._take(request.placement.other, self._blocks_for(request.num_tokens - 1))
                swaps[kind].append(SwapData(rid, tuple(blocks)))
                self.free[request.placement].extend(request.blocks)
                request.blocks, request.placement = blocks, request.placement.other
        new_requests, cached_requests = [], []
        for rid, request in self.requests.items():
            if sub_batch_of is not None:
                request.sub_batch = sub_batch_of(rid)
            missing = self._blocks_for(request.num_tokens) - len(request.blocks)
            fresh = self._take(request.placement, max(missing, 0))
            request.blocks.extend(fresh)
            if request.outputs:
                cached_requests.append(CachedRequestData(rid, tuple(fresh), request.sub_batch))
            else:
                new_requests.append(NewRequestData(
                    rid, tuple(request.prompt), GREEDY, tuple(request.blocks), 0, request.placement, request.sub_batch
                ))
        plan = StepPlan(
            self.step_id, tuple(new_requests), tuple(cached_requests), tuple(self._freed), mode=mode,
            swap_out=tuple(swaps["out"]), swap_in=tuple(swaps["in"]),
        )
        self._freed = []
        self.step_id += 1
        return plan

    def run(self, plan: StepPlan) -> StepOutput:
        output = self.runner.execute(plan)
        for rid, token in output.sampled.items():
            self.requests[rid].outputs.append(token)
        self.outputs.append(output)
        return output

    def tokens(self) -> dict[str, list[int]]:
        return {rid: r.outputs for rid, r in self.requests.items()}
