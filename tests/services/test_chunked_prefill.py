"""Chunked prefill on the gpu_worker: prompts prefilled in uneven chunks, on either pool, next to other requests'
decode rows, in the three execution modes, give transformers' greedy tokens (fp32); a non-final chunk samples
nothing; plans that misuse chunks are refused naming the field; a failed step leaves a chunked request as it was."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from apex_serve.errors import CpuPoolLost, InvalidArgument
from apex_serve.types import (
    CachedRequestData,
    ExecutionMode,
    NewRequestData,
    Placement,
    SamplingParams,
    StepPlan,
    SwapData,
)
from cpu_attention_worker.client import CpuAttentionError
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True, logprobs=1)
BLOCK_SIZE = 4
STEPS = 24
MODELS = ("mha_model_dir", "gqa_llama3_model_dir")


@dataclass(frozen=True)
class Arrival:
    length: int  # prompt tokens
    chunks: tuple[int, ...]  # prefill chunk sizes, summing to length; (): the whole prompt in one step
    step: int  # the step it arrives at


ARRIVALS = {  # uneven chunks crossing block boundaries, chunks of one token, arrivals while others decode
    "r0": Arrival(37, (16, 5, 16), 0),
    "r1": Arrival(9, (), 0),
    "r2": Arrival(50, (1, 7, 1, 30, 11), 1),
    "r3": Arrival(23, (), 2),
    "r4": Arrival(61, (13, 13, 13, 13, 9), 3),
    "r5": Arrival(30, (29, 1), 4),
}


def prompt_of(rid: str) -> list[int]:
    rng = random.Random(rid)
    return [256] + [rng.randrange(256) for _ in range(ARRIVALS[rid].length - 1)]


@dataclass
class Tracked:
    prompt: list[int]
    chunks: list[int]  # chunks still to schedule
    placement: Placement
    sub_batch: int
    admitted: bool = False
    blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


class ChunkingScheduler:
    """Plays a chunking scheduler: a prompt's blocks all at admission, one chunk per step, decode rows alongside."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        rng = random.Random(0)
        info = runner.info
        self.free = {
            Placement.GPU: rng.sample(range(info.num_kv_blocks), info.num_kv_blocks),
            Placement.CPU: rng.sample(range(info.num_cpu_kv_blocks), info.num_cpu_kv_blocks),
        }
        self.requests: dict[str, Tracked] = {}
        self.step_id = 0

    def add(self, rid: str, prompt: list[int], chunks: tuple[int, ...], placement: Placement, sub_batch: int) -> None:
        self.requests[rid] = Tracked(prompt, list(chunks), placement, sub_batch)

    def _blocks(self, request: Tracked, num_tokens: int) -> tuple[int, ...]:
        missing = -(-num_tokens // BLOCK_SIZE) - len(request.blocks)
        fresh = [self.free[request.placement].pop() for _ in range(max(missing, 0))]
        request.blocks.extend(fresh)
        return tuple(fresh)

    def plan(self, mode: ExecutionMode) -> tuple[StepPlan, set[str]]:
        """The next plan and the requests that must sample in it."""
        new, cached, samplers = [], [], set()
        for rid, r in self.requests.items():
            if not r.admitted:
                chunk = r.chunks.pop(0) if r.chunks else 0
                blocks = self._blocks(r, len(r.prompt))
                new.append(NewRequestData(rid, tuple(r.prompt), GREEDY, blocks, 0, r.placement, r.sub_batch, chunk))
                r.admitted = True
            elif r.chunks:
                cached.append(CachedRequestData(rid, (), r.sub_batch, r.chunks.pop(0)))
            else:
                fresh = self._blocks(r, len(r.prompt) + len(r.outputs))
                cached.append(CachedRequestData(rid, fresh, r.sub_batch))
            if not r.chunks:
                samplers.add(rid)
        plan = StepPlan(self.step_id, tuple(new), tuple(cached), mode=mode)
        self.step_id += 1
        return plan, samplers

    def step(self, mode: ExecutionMode) -> None:
        plan, samplers = self.plan(mode)
        output = self.runner.execute(plan)
        assert set(output.sampled) == samplers, f"step {plan.step_id}: a request mid-prefill sampled, or one missed"
        assert set(output.logprobs) == samplers
        for rid, token in output.sampled.items():
            self.requests[rid].outputs.append(token)


def make_runner(model_dir: Path, cpu_address: str = "", **overrides: object) -> ModelRunner:
    settings: dict[str, object] = {
        "model_dir": str(model_dir), "device": "cpu", "dtype": "float32",  # exact against fp32 references
        "block_size": BLOCK_SIZE, "num_kv_blocks": 256, "num_threads": 1,
        "cpu_worker_address": cpu_address, "cpu_num_kv_blocks": 256 if cpu_address else 0, "cpu_max_rows": 8,
    }
    return ModelRunner(GpuWorkerConfig(**(settings | overrides)))  # type: ignore[arg-type]


def run(runner: ModelRunner, mode: ExecutionMode, placement: Callable[[int], Placement],
        sub_batch: Callable[[int], int] = lambda i: 0, chunked: bool = True) -> dict[str, list[int]]:
    """STEPS steps of the ARRIVALS; request i placed by placement(i) in sub-batch sub_batch(i)."""
    scheduler = ChunkingScheduler(runner)
    try:
        for step in range(STEPS):
            for i, (rid, arrival) in enumerate(ARRIVALS.items()):
                if arrival.step == step:
                    chunks = arrival.chunks if chunked else ()
                    scheduler.add(rid, prompt_of(rid), chunks, placement(i), sub_batch(i))
            scheduler.step(mode)
        return {rid: r.outputs for rid, r in scheduler.requests.items()}
    finally:
        runner.close()


def hf_tokens(model_dir: Path, counts: dict[str, int]) -> dict[str, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = {}
    for rid, count in counts.items():
        input_ids = torch.tensor([prompt_of(rid)])
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=count, pad_token_id=0)
        out[rid] = generated[0, input_ids.shape[1]:].tolist()
    return out


@pytest.fixture(scope="module", params=MODELS)
def reference(request: pytest.FixtureRequest) -> tuple[Path, dict[str, list[int]]]:
    """The model, and the unchunked GPU-only run's tokens, which equal transformers'."""
    model_dir = request.getfixturevalue(request.param)
    unchunked = run(make_runner(model_dir), ExecutionMode.GPU_ONLY, lambda i: Placement.GPU, chunked=False)
    assert len({tuple(t[:8]) for t in unchunked.values()}) == len(unchunked), "the continuations do not vary"
    assert unchunked == hf_tokens(model_dir, {rid: len(t) for rid, t in unchunked.items()})
    return model_dir, unchunked


def alternate(i: int) -> Placement:
    return [Placement.CPU, Placement.GPU][i % 2]


CASES = {  # name: (mode, placement of request i, sub-batch of request i)
    "gpu_only_accelerator_pool": (ExecutionMode.GPU_ONLY, lambda i: Placement.GPU, lambda i: 0),
    "async_overlap_cpu_chunks_and_cpu_decodes": (ExecutionMode.ASYNC_OVERLAP, alternate, lambda i: 0),
    "async_overlap_all_cpu": (ExecutionMode.ASYNC_OVERLAP, lambda i: Placement.CPU, lambda i: 0),
    "asym_pipeline_chunks_in_both_sub_batches": (
        ExecutionMode.ASYM_PIPELINE, lambda i: [Placement.CPU, Placement.GPU][i // 2 % 2], lambda i: i % 2,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_prefill_decodes_the_tokens_of_transformers_and_the_unchunked_run(
    case: str, reference: tuple[Path, dict[str, list[int]]], cpu_worker: str
) -> None:
    model_dir, expected = reference
    mode, placement, sub_batch = CASES[case]
    tokens = run(make_runner(model_dir, cpu_worker), mode, placement, sub_batch)
    for rid, arrival in ARRIVALS.items():
        count = STEPS - arrival.step - max(len(arrival.chunks) - 1, 0)  # one step per chunk before sampling
        assert len(tokens[rid]) == count
        assert tokens[rid] == expected[rid][:count], f"{case}: {rid} diverges from transformers (and the unchunked run)"


def test_a_non_final_chunk_samples_nothing_and_the_last_chunk_samples(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    prompt = prompt_of("r0")
    first = runner.execute(StepPlan(0, (NewRequestData("r", tuple(prompt), GREEDY, tuple(range(10)), 0,
                                                       num_scheduled_tokens=16),)))
    middle = runner.execute(StepPlan(1, cached_requests=(CachedRequestData("r", num_scheduled_tokens=20),)))
    last = runner.execute(StepPlan(2, cached_requests=(CachedRequestData("r", num_scheduled_tokens=1),)))
    assert first.sampled == {} and middle.sampled == {} and first.logprobs == {}
    assert list(last.sampled) == ["r"] and list(last.logprobs) == ["r"]


def new(rid: str, length: int, chunk: int, blocks: int | None = None, first_block: int = 0) -> NewRequestData:
    count = -(-length // BLOCK_SIZE) if blocks is None else blocks
    return NewRequestData(rid, tuple(prompt_of("r0")[:length]), GREEDY, tuple(range(first_block, first_block + count)),
                          0, num_scheduled_tokens=chunk)


def chunk(rid: str, tokens: int) -> StepPlan:
    return StepPlan(1, cached_requests=(CachedRequestData(rid, num_scheduled_tokens=tokens),))


def test_plans_that_misuse_chunks_are_invalid_arguments_naming_the_field(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    with pytest.raises(InvalidArgument, match=r"num_scheduled_tokens: .*'a': 11 is outside \[0, 10\]"):
        runner.execute(StepPlan(0, (new("a", 10, 11),)))
    with pytest.raises(InvalidArgument, match=r"block_ids: .*'a' has 2 blocks, position 9 needs 3"):
        runner.execute(StepPlan(0, (new("a", 10, 4, blocks=2),)))
    runner.execute(StepPlan(0, (new("a", 10, 4), new("b", 6, 0, first_block=10))))  # a prefilling, b decoding
    with pytest.raises(InvalidArgument, match=r"num_scheduled_tokens: .*'a': 7 is outside \[1, 6\]"):
        runner.execute(chunk("a", 7))
    with pytest.raises(InvalidArgument, match=r"num_scheduled_tokens: .*'a' is still prefilling \(4 of 10"):
        runner.execute(chunk("a", 0))
    with pytest.raises(InvalidArgument, match=r"num_scheduled_tokens: .*'b' is not prefilling"):
        runner.execute(chunk("b", 3))
    with pytest.raises(InvalidArgument, match=r"swap_out: .*'a' is still prefilling"):
        runner.execute(StepPlan(1, swap_out=(SwapData("a", (0, 1, 2)),), mode=ExecutionMode.ASYNC_OVERLAP))
    assert runner.execute(chunk("a", 6)).sampled.keys() == {"a"}, "a refused plan changed the request"


def chunked_tokens(runner: ModelRunner, fail_second_chunk: bool) -> list[int]:
    """A 30-token prompt in chunks of 10 on the accelerator, then 6 decode steps; the second chunk's step may lose
    the CPU pool in its forward (and is then run again)."""
    prompt = tuple(prompt_of("r4")[:30])
    runner.execute(StepPlan(0, (NewRequestData("r", prompt, GREEDY, tuple(range(8)), 0, num_scheduled_tokens=10),)))
    second = chunk("r", 10)
    if fail_second_chunk:
        logits = runner.forward.logits

        def lost(*args: object) -> torch.Tensor:
            runner.forward.logits = logits
            raise CpuAttentionError("the cpu_attention_worker died")

        runner.forward.logits = lost
        with pytest.raises(CpuPoolLost):
            runner.execute(second)
    runner.execute(second)
    tokens = [runner.execute(chunk("r", 10)).sampled["r"]]
    for step in range(6):
        plan = StepPlan(3 + step, cached_requests=(CachedRequestData("r", (8,) if step == 0 else ()),))
        tokens.append(runner.execute(plan).sampled["r"])
    return tokens


def test_a_chunk_whose_step_lost_the_cpu_pool_runs_again_from_where_it_was(mha_model_dir: Path) -> None:
    clean = chunked_tokens(make_runner(mha_model_dir), fail_second_chunk=False)
    assert chunked_tokens(make_runner(mha_model_dir), fail_second_chunk=True) == clean


@pytest.mark.gpu
def test_cuda_device_chunks_on_both_pools_decode_the_cuda_unchunked_tokens(mha_model_dir: Path, cpu_worker: str) -> None:
    """On CUDA a CPU-placed chunk's earlier KV is gathered from the CPU pool and brought to the device."""
    unchunked = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.GPU_ONLY,
                    lambda i: Placement.GPU, chunked=False)
    chunked = run(make_runner(mha_model_dir, cpu_worker, device="cuda"), ExecutionMode.ASYNC_OVERLAP, alternate)
    for rid, tokens in chunked.items():
        assert tokens == unchunked[rid][: len(tokens)], f"{rid} diverges from the unchunked CUDA run"
