"""Prompt logprobs on the gpu_worker: every prompt token's logprob and top k equal transformers' log_softmax of the
logits (fp32) for whole prompts and uneven chunks, in the three execution modes, with CPU-placed prefills beside CPU
decode rows, on MHA and GQA models; requests that did not ask get none and sample the tokens they sample without
them; a recomputed request gets none; through the scheduler, a chunked prompt's first output carries them all."""

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from apex_serve.types import (
    CachedRequestData,
    ExecutionMode,
    NewRequestData,
    Placement,
    SamplingParams,
    StepPlan,
    TokenLogprob,
)
from apex_tools.local_engine import LocalEngine
from gpu_worker import lm_head
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from scheduler_service.config import SchedulerConfig

BLOCK_SIZE = 4
STEPS = 7
MODELS = ("mha_model_dir", "gqa_llama3_model_dir")
GREEDY = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)


@dataclass(frozen=True)
class Arrival:
    length: int  # prompt tokens
    chunks: tuple[int, ...]  # prefill chunk sizes; (): the whole prompt in one step
    step: int  # the step it arrives at
    top: int | None  # prompt_logprobs asked for


ARRIVALS = {  # "c" decodes while the others prefill; chunks of one token at either end, chunks crossing blocks
    "c": Arrival(9, (), 0, None),
    "a": Arrival(37, (16, 5, 16), 1, 3),
    "b": Arrival(20, (), 1, 5),
    "d": Arrival(30, (1, 28, 1), 2, 0),
}


def prompt_of(rid: str) -> list[int]:
    rng = random.Random(f"prompt-logprobs-{rid}")
    return [256] + [rng.randrange(256) for _ in range(ARRIVALS[rid].length - 1)]


@dataclass
class Tracked:
    prompt: list[int]
    sampling: SamplingParams
    chunks: list[int]
    placement: Placement
    sub_batch: int
    admitted: bool = False
    blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


class Driver:
    """Plays a chunking scheduler: a prompt's blocks all at admission, one chunk per step, decode rows alongside;
    collects each request's tokens and prompt logprobs."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.free = {Placement.GPU: list(range(runner.info.num_kv_blocks)),
                     Placement.CPU: list(range(runner.info.num_cpu_kv_blocks))}
        self.requests: dict[str, Tracked] = {}
        self.step_id = 0

    def add(self, rid: str, sampling: SamplingParams, placement: Placement, sub_batch: int) -> None:
        arrival = ARRIVALS[rid]
        self.requests[rid] = Tracked(prompt_of(rid), sampling, list(arrival.chunks), placement, sub_batch)

    def _blocks(self, r: Tracked, num_tokens: int) -> tuple[int, ...]:
        fresh = [self.free[r.placement].pop() for _ in range(max(-(-num_tokens // BLOCK_SIZE) - len(r.blocks), 0))]
        r.blocks.extend(fresh)
        return tuple(fresh)

    def step(self, mode: ExecutionMode) -> None:
        new, cached = [], []
        for rid, r in self.requests.items():
            if not r.admitted:
                chunk = r.chunks.pop(0) if r.chunks else 0
                blocks = self._blocks(r, len(r.prompt))
                new.append(NewRequestData(rid, tuple(r.prompt), r.sampling, blocks, 0, r.placement, r.sub_batch, chunk))
                r.admitted = True
            elif r.chunks:
                cached.append(CachedRequestData(rid, (), r.sub_batch, r.chunks.pop(0)))
            else:
                cached.append(CachedRequestData(rid, self._blocks(r, len(r.prompt) + len(r.outputs)), r.sub_batch))
        output = self.runner.execute(StepPlan(self.step_id, tuple(new), tuple(cached), mode=mode))
        self.step_id += 1
        for rid, token in output.sampled.items():
            self.requests[rid].outputs.append(token)
        for rid, logprobs in output.prompt_logprobs.items():
            self.requests[rid].prompt_logprobs.extend(logprobs)


def make_runner(model_dir: Path, cpu_address: str = "") -> ModelRunner:
    return ModelRunner(GpuWorkerConfig(
        model_dir=str(model_dir), device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=128, num_threads=1,
        cpu_worker_address=cpu_address, cpu_num_kv_blocks=128 if cpu_address else 0, cpu_max_rows=8,
    ))


def run(runner: ModelRunner, mode: ExecutionMode, placement: dict[str, Placement], sub_batch: dict[str, int],
        ask: bool = True) -> Driver:
    driver = Driver(runner)
    try:
        for step in range(STEPS):
            for rid, arrival in ARRIVALS.items():
                if arrival.step == step:
                    sampling = replace(GREEDY, prompt_logprobs=arrival.top if ask else None)
                    driver.add(rid, sampling, placement.get(rid, Placement.GPU), sub_batch.get(rid, 0))
            driver.step(mode)
        return driver
    finally:
        runner.close()


def hf_logprobs(model_dir: Path) -> dict[str, torch.Tensor]:
    """transformers' log_softmax of the fp32 logits [prompt tokens, vocab] of each prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return {rid: model(torch.tensor([prompt_of(rid)])).logits[0].float().log_softmax(-1) for rid in ARRIVALS}


@pytest.fixture(scope="module", params=MODELS)
def reference(request: pytest.FixtureRequest) -> tuple[Path, dict[str, torch.Tensor], dict[str, list[int]]]:
    """The model, transformers' prompt logprobs, and the tokens of a GPU-only run in which nobody asks for them."""
    model_dir = request.getfixturevalue(request.param)
    tokens = {rid: r.outputs for rid, r in run(make_runner(model_dir), ExecutionMode.GPU_ONLY, {}, {}, False)
              .requests.items()}
    return model_dir, hf_logprobs(model_dir), tokens


def assert_matches_transformers(rid: str, got: list[TokenLogprob], expected: torch.Tensor, top: int) -> None:
    prompt = prompt_of(rid)
    assert [lp.token_id for lp in got] == prompt[1:], f"{rid}: not one logprob per prompt token after the first"
    for i, lp in enumerate(got, start=1):
        row = expected[i - 1]  # [vocab]: position i - 1 predicts prompt token i
        assert lp.logprob == pytest.approx(row[prompt[i]].item(), abs=1e-4), f"{rid}: prompt token {i}'s logprob"
        values, ids = row.topk(top)
        assert [t for t, _ in lp.top] == ids.tolist(), f"{rid}: the top {top} at position {i - 1}"
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


CASES = {  # name: (mode, placement by request (else GPU), sub-batch by request (else 0))
    "gpu_only": (ExecutionMode.GPU_ONLY, {}, {}),
    "async_overlap_cpu_prefills_beside_cpu_decodes": (
        ExecutionMode.ASYNC_OVERLAP, {"c": Placement.CPU, "a": Placement.CPU, "d": Placement.CPU}, {},
    ),
    "asym_pipeline": (
        ExecutionMode.ASYM_PIPELINE, {"c": Placement.CPU, "a": Placement.CPU, "b": Placement.CPU}, {"c": 1, "b": 1},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_logprobs_equal_transformers_and_leave_the_sampled_tokens_unchanged(
    case: str, reference: tuple[Path, dict[str, torch.Tensor], dict[str, list[int]]], cpu_worker: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir, expected, tokens = reference
    monkeypatch.setattr(lm_head, "PROMPT_SLICE_ROWS", 7)  # several slices per step
    mode, placement, sub_batch = CASES[case]
    driver = run(make_runner(model_dir, cpu_worker), mode, placement, sub_batch)
    for rid, arrival in ARRIVALS.items():
        got = driver.requests[rid]
        if arrival.top is None:
            assert got.prompt_logprobs == [], f"{rid} did not ask for prompt logprobs"
        else:
            assert_matches_transformers(rid, got.prompt_logprobs, expected[rid], arrival.top)
        assert got.outputs == tokens[rid], f"{case}: {rid}'s tokens differ from a run without prompt logprobs"


def test_a_recomputed_request_gets_no_prompt_logprobs(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    asks = replace(GREEDY, prompt_logprobs=2)
    prompt = tuple(prompt_of("b"))
    first = runner.execute(StepPlan(0, (NewRequestData("r", prompt, asks, tuple(range(6)), 0),)))
    assert len(first.prompt_logprobs["r"]) == len(prompt) - 1
    tokens = (*prompt, first.sampled["r"])
    again = runner.execute(StepPlan(1, (NewRequestData("r", tokens, asks, tuple(range(6, 12)), 1),),
                                    freed_request_ids=("r",)))
    assert again.prompt_logprobs == {} and list(again.sampled) == ["r"]


def test_the_scheduler_delivers_a_chunked_prompts_logprobs_on_its_first_output(
    reference: tuple[Path, dict[str, torch.Tensor], dict[str, list[int]]],
) -> None:
    model_dir, expected, _ = reference
    engine = LocalEngine(
        GpuWorkerConfig(model_dir=str(model_dir), device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=64, num_threads=1),
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, sample_layers_every=0),
    )
    a, c = engine.generate([prompt_of("a"), prompt_of("c")],
                           [replace(GREEDY, max_tokens=3, prompt_logprobs=4), replace(GREEDY, max_tokens=3)])
    assert_matches_transformers("a", list(a.prompt_logprobs), expected["a"], 4)
    assert c.prompt_logprobs == () and len(a.token_ids) == len(c.token_ids) == 3
