"""Sampler: greedy, temperature, top-k, top-p, and seeded reproducibility (also through ModelRunner)."""

from pathlib import Path

import torch

from apex_serve.types import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.sampler import Sampler

CPU = torch.device("cpu")
VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, vocab]


def sample_rows(logits: torch.Tensor, params: SamplingParams, sampler_seed: int = 0) -> list[int]:
    rows = logits.shape[0]
    return Sampler(sampler_seed, CPU).sample(logits, [params] * rows, [0] * rows)


def test_greedy_is_argmax() -> None:
    logits = random_logits(16)
    assert sample_rows(logits, SamplingParams(temperature=0.0)) == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = random_logits(64)
    argmax = logits.argmax(-1).tolist()
    assert sample_rows(logits, SamplingParams(temperature=1.5, top_k=1)) == argmax
    assert sample_rows(logits, SamplingParams(temperature=1.5, top_p=1e-6)) == argmax


def test_top_k_and_top_p_restrict_the_support() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)  # [rows, 4]
    assert set(sample_rows(logits, SamplingParams(top_p=0.7))) == {0, 1}
    assert set(sample_rows(logits, SamplingParams(top_k=3))) == {0, 1, 2}


def test_unseeded_samples_follow_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    tokens = torch.tensor(sample_rows(logits.expand(20000, 4), SamplingParams(temperature=1.0)))
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, logits.softmax(-1), atol=0.015, rtol=0)


def test_higher_temperature_spreads_the_samples() -> None:
    logits = random_logits(1).expand(3000, VOCAB)
    cold = sample_rows(logits, SamplingParams(temperature=0.3))
    hot = sample_rows(logits, SamplingParams(temperature=3.0))
    assert len(set(hot)) > 2 * len(set(cold))
    mode = logits[0].argmax().item()
    assert cold.count(mode) > 2 * hot.count(mode)


def test_seeded_tokens_do_not_depend_on_batch_position_or_other_rows() -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234)
    logits = random_logits(1, seed=5)[0] / 3  # [vocab], flat enough to vary
    alone = [Sampler(0, CPU).sample(logits[None], [seeded], [i])[0] for i in range(20)]
    others = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=0.0),
    ]
    sampler = Sampler(77, CPU)
    for position in range(4):
        params = others[:position] + [seeded] + others[position:]
        batch = torch.cat([random_logits(position, seed=6), logits[None], random_logits(3 - position, seed=7)])
        in_batch = [sampler.sample(batch, params, [i] * 4)[position] for i in range(20)]
        assert in_batch == alone, f"seeded row at batch position {position} changed its tokens"
    assert len(set(alone)) > 5


def test_different_seeds_give_different_tokens() -> None:
    logits = random_logits(1, seed=5) / 3  # [1, vocab]

    def draws(seed: int) -> list[int]:
        return [Sampler(0, CPU).sample(logits, [SamplingParams(seed=seed)], [i])[0] for i in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert sum(a != b for a, b in zip(draws(1), draws(2))) >= 10


def test_seeded_request_reproduces_alone_batched_and_after_preemption(mha_model_dir: Path) -> None:
    def runner(seed: int) -> ModelRunner:
        config = GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", num_kv_blocks=64, num_threads=2, seed=seed)
        return ModelRunner(config)

    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=12)
    prompt = (256, 72, 105, 33)

    def generate(r: ModelRunner, companions: int, preempt_at: int | None = None) -> list[int]:
        noise = SamplingParams(temperature=1.0)
        news = [NewRequestData(f"c{i}", (256, i + 1), noise, (10 + i,)) for i in range(companions)]
        out = r.execute(StepPlan(0, (NewRequestData("s", prompt, seeded, (0, 1)), *news)))
        tokens = [out.sampled["s"]]
        cached = tuple(CachedRequestData(f"c{i}") for i in range(companions))
        for step in range(1, 12):
            if step == preempt_at:
                resumed = NewRequestData("s", prompt + tuple(tokens), seeded, (2, 3, 4, 5), len(tokens))
                out = r.execute(StepPlan(step, (resumed,), cached, freed_request_ids=("s",)))
            else:
                out = r.execute(StepPlan(step, cached_requests=(CachedRequestData("s"), *cached)))
            tokens.append(out.sampled["s"])
        return tokens

    alone = generate(runner(0), companions=0)
    assert generate(runner(123), companions=3) == alone
    assert generate(runner(0), companions=2, preempt_at=6) == alone
    assert len(set(alone)) > 3
