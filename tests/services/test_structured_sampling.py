"""Structured outputs on the gpu_worker: under a JSON schema, a regex or a choice, at temperature 1 with several
seeds, every output (decoded) is valid and ends with EOS; a constrained request placed on the CPU pool samples the
tokens it samples on the accelerator; a preempted and recomputed one continues with the tokens of an uninterrupted
run; an unconstrained request beside constrained ones samples its tokens alone; the grammar's mask intersects the
request's own restrictions and logprobs stay those of the model; a grammar the worker cannot compile ends its
request with EOS."""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import jsonschema
import llguidance
import pytest
import torch
from tokenizers import Tokenizer

from apex_serve.types import CachedRequestData, ExecutionMode, NewRequestData, Placement, SamplingParams, StepPlan
from apex_tools.default_model import BOS_TOKEN_ID, EOS_TOKEN_ID
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.grammar import GrammarMask, token_bitmask
from gpu_worker.model_runner import ModelRunner
from gpu_worker.sampler import Sampler, compute_logprobs

BLOCK_SIZE = 16
BLOCKS_PER_REQUEST = 16  # max_model_len 256
SEEDS = (1, 2, 3, 4)
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 3, "maximum": 42},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["color", "count", "tags", "name"],
    "additionalProperties": False,
}
JSON_GRAMMAR = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
REGEX = r"(0|[1-9][0-9]{0,3})-[a-z]{2,5}"
CHOICES = ("yes", "no", "maybe")
CHOICE_GRAMMAR = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(f'"{c}"' for c in CHOICES))
PROMPT = (BOS_TOKEN_ID, *b"Answer: ")


def sampling(grammar: str, seed: int | None, max_tokens: int = 200) -> SamplingParams:
    return SamplingParams(temperature=1.0 if seed is not None else 0.0, seed=seed, max_tokens=max_tokens,
                          structured_grammar=grammar)


@dataclass
class Request:
    sampling: SamplingParams
    placement: Placement
    blocks: tuple[int, ...]
    outputs: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def finished(self) -> bool:
        return EOS_TOKEN_ID in self.outputs or len(self.outputs) >= self.sampling.max_tokens


def generate(runner: ModelRunner, requests: dict[str, tuple[SamplingParams, Placement]],
             mode: ExecutionMode = ExecutionMode.GPU_ONLY, preempt: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Every request from PROMPT until it samples EOS or max_tokens, then freed; preempt: request -> the output count
    at which it is freed and recomputed (a new request carrying its outputs)."""
    tracked = {rid: Request(params, placement, tuple(range(i * BLOCKS_PER_REQUEST, (i + 1) * BLOCKS_PER_REQUEST)))
               for i, (rid, (params, placement)) in enumerate(requests.items())}
    preempt = dict(preempt or {})
    freed: list[str] = []
    for step in range(1000):
        new, cached = [], []
        for rid, r in tracked.items():
            if r.finished:
                continue
            if r.started and preempt.get(rid) == len(r.outputs):
                del preempt[rid]
                freed.append(rid)
                r.started = False
            if r.started:
                cached.append(CachedRequestData(rid))
            else:
                new.append(NewRequestData(rid, (*PROMPT, *r.outputs), r.sampling, r.blocks, len(r.outputs),
                                          r.placement))
                r.started = True
        if not new and not cached and not freed:
            return {rid: r.outputs for rid, r in tracked.items()}
        output = runner.execute(StepPlan(step, tuple(new), tuple(cached), tuple(freed), mode=mode))
        for rid, token in output.sampled.items():
            tracked[rid].outputs.append(token)
        freed = [rid for rid in output.sampled if tracked[rid].finished]
    raise AssertionError("the requests did not finish in 1000 steps")


@pytest.fixture(scope="module")
def runner(mha_model_dir: Path, cpu_worker: str) -> Iterator[ModelRunner]:
    model_runner = ModelRunner(GpuWorkerConfig(
        model_dir=str(mha_model_dir), device="cpu", block_size=BLOCK_SIZE, num_kv_blocks=8 * BLOCKS_PER_REQUEST,
        num_threads=1, cpu_worker_address=cpu_worker, cpu_num_kv_blocks=8 * BLOCKS_PER_REQUEST, cpu_max_rows=8,
    ))
    yield model_runner
    model_runner.close()


@pytest.fixture(scope="module")
def tokenizer(mha_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(mha_model_dir / "tokenizer.json"))


def text_of(tokenizer: Tokenizer, rid: str, tokens: list[int]) -> str:
    assert tokens and tokens[-1] == EOS_TOKEN_ID, f"{rid} did not end with EOS within max_tokens: {tokens}"
    return tokenizer.decode(tokens[:-1])


def test_json_schema_outputs_parse_and_validate_at_temperature_one(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    outputs = generate(runner, {f"s{seed}": (sampling(JSON_GRAMMAR, seed), Placement.GPU) for seed in SEEDS})
    texts = {rid: text_of(tokenizer, rid, tokens) for rid, tokens in outputs.items()}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts.values())) > 1, "different seeds sampled the same document"
    assert not runner._requests, "finished requests kept their state (and matchers)"


def test_regex_and_choice_outputs_match_their_grammars(runner: ModelRunner, tokenizer: Tokenizer) -> None:
    regex = llguidance.LLMatcher.grammar_from_regex(REGEX)
    requests = {f"re{seed}": (sampling(regex, seed), Placement.GPU) for seed in SEEDS}
    requests |= {f"choice{seed}": (sampling(CHOICE_GRAMMAR, seed), Placement.GPU) for seed in SEEDS}
    outputs = generate(runner, requests)
    for seed in SEEDS:
        text = text_of(tokenizer, f"re{seed}", outputs[f"re{seed}"])
        assert re.fullmatch(REGEX, text), f"seed {seed}: {text!r} does not match {REGEX}"
        assert text_of(tokenizer, f"choice{seed}", outputs[f"choice{seed}"]) in CHOICES


def test_an_unconstrained_request_beside_constrained_ones_samples_its_tokens_alone(runner: ModelRunner) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=30)
    alone = generate(runner, {"free": (free, Placement.GPU)})["free"]
    beside = generate(runner, {"json": (sampling(JSON_GRAMMAR, 5), Placement.GPU), "free": (free, Placement.GPU),
                               "re": (sampling(llguidance.LLMatcher.grammar_from_regex(REGEX), None), Placement.GPU)})
    assert beside["free"] == alone


def test_a_constrained_request_on_the_cpu_pool_samples_what_it_samples_on_the_accelerator(
    runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    requests = {f"s{seed}": (sampling(JSON_GRAMMAR, seed), Placement.GPU) for seed in SEEDS[:2]}
    on_gpu = generate(runner, requests)
    on_cpu = generate(runner, {rid: (p, Placement.CPU) for rid, (p, _) in requests.items()},
                      ExecutionMode.ASYNC_OVERLAP)
    for rid, tokens in on_cpu.items():
        jsonschema.validate(json.loads(text_of(tokenizer, rid, tokens)), SCHEMA)
        assert tokens == on_gpu[rid], f"{rid} on the CPU pool diverges from the accelerator run"


def test_a_preempted_constrained_request_continues_as_if_uninterrupted(
    runner: ModelRunner, tokenizer: Tokenizer
) -> None:
    requests = {"a": (sampling(JSON_GRAMMAR, 7), Placement.GPU), "b": (sampling(JSON_GRAMMAR, 8), Placement.GPU)}
    uninterrupted = generate(runner, requests)
    recomputed = generate(runner, requests, preempt={"a": 5, "b": 12})
    assert recomputed == uninterrupted
    for rid, tokens in recomputed.items():
        jsonschema.validate(json.loads(text_of(tokenizer, rid, tokens)), SCHEMA)


def test_a_grammar_the_worker_cannot_compile_ends_its_request_with_eos(
    runner: ModelRunner, caplog: pytest.LogCaptureFixture
) -> None:
    outputs = generate(runner, {"bad": (sampling("start: foo(", 1), Placement.GPU)})
    assert outputs["bad"] == [EOS_TOKEN_ID]
    assert "structured output ends with EOS" in caplog.text


def mask_of(allowed: list[int], vocab: int, rows: list[int]) -> GrammarMask:
    words = -(-vocab // 32)
    return GrammarMask(rows, torch.stack([token_bitmask(allowed, words) for _ in rows]))


def test_the_grammar_mask_intersects_allowed_token_ids_and_logprobs_stay_the_models() -> None:
    vocab = 70
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))  # [3, vocab]
    params = [SamplingParams(temperature=1.0, seed=i, allowed_token_ids=(5, 33, 63, 64), logprobs=2) for i in range(3)]
    sampler = Sampler(0, torch.device("cpu"), eos_token_ids=(1,))
    for _ in range(20):
        tokens = sampler.sample(logits, params, [0, 0, 0], grammar=mask_of([3, 33, 63], vocab, [0, 2]))
        assert tokens[0] in (33, 63) and tokens[2] in (33, 63) and tokens[1] in (5, 33, 63, 64)
        params = [replace(p, seed=p.seed + 3) for p in params]
    logprobs = compute_logprobs(logits, params, tokens)
    assert logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1)[tokens[0]].item())


def test_a_complete_grammar_wins_over_min_tokens_when_they_leave_no_token() -> None:
    logits = torch.zeros(1, 40)  # [1, vocab]
    sampler = Sampler(0, torch.device("cpu"), eos_token_ids=(2,))
    tokens = sampler.sample(logits, [SamplingParams(temperature=0.0, min_tokens=5)], [1],
                            grammar=mask_of([2], 40, [0]))
    assert tokens == [2]
