"""Penalties, min_tokens, logprobs, min_p, allowed_token_ids and bad words: sampler against transformers / plain
formulas, then through the ModelRunner, the scheduler core (LocalEngine) and the protobuf edge."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, RepetitionPenaltyLogitsProcessor

from apex_serve import convert
from apex_serve.types import (
    CachedRequestData,
    FinishReason,
    NewRequestData,
    RequestOutput,
    SamplingParams,
    StepOutput,
    StepPlan,
    TokenLogprob,
    WorkerInfo,
)
from apex_tools.local_engine import LocalEngine
from gateway.tokenizer import bad_words_token_ids, load_tokenizer
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.logits_processors import apply_penalties, banned_by_bad_words
from gpu_worker.model_runner import ModelRunner
from gpu_worker.sampler import Sampler, compute_logprobs, filter_min_p
from scheduler_service.config import SchedulerConfig
from scheduler_service.scheduler import Scheduler

CPU = torch.device("cpu")
VOCAB = 50
GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[256, 72, 101, 108, 108, 111], [256, 3, 1, 4, 1, 5, 9, 2, 6], [256, 200, 17], [256, 42, 42, 42, 7]]


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, vocab]


def histories(rows: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Per row: prompt then output token ids (with repeats), and the number of output tokens."""
    g = torch.Generator().manual_seed(seed)
    token_ids = [torch.randint(0, VOCAB // 2, (5 + 3 * r,), generator=g).tolist() for r in range(rows)]
    return token_ids, [min(r * 2, len(t)) for r, t in enumerate(token_ids)]


def worker_config(model_dir: Path) -> GpuWorkerConfig:
    return GpuWorkerConfig(model_dir=str(model_dir), device="cpu", num_kv_blocks=64, max_model_len=1024, num_threads=1)


# -- sampler and logits processors ---------------------------------------------------------------


def test_repetition_penalty_matches_transformers_over_prompt_and_output_tokens() -> None:
    logits = random_logits(4)
    token_ids, num_outputs = histories(4)
    penalties = [1.0, 1.3, 0.7, 2.0]
    params = [SamplingParams(temperature=0.0, repetition_penalty=r) for r in penalties]
    ours = apply_penalties(logits, params, num_outputs, token_ids)
    for row, penalty in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([token_ids[row]]), logits[row : row + 1])
        torch.testing.assert_close(ours[row], expected[0], msg=f"row {row} penalty {penalty}")
    tokens = Sampler(0, CPU).sample(logits, params, num_outputs, token_ids)
    assert tokens == ours.argmax(-1).tolist(), "greedy rows did not sample from the penalised logits"


def test_frequency_and_presence_penalties_follow_openai_formula_over_output_tokens_only() -> None:
    logits = random_logits(4, seed=1)
    token_ids, num_outputs = histories(4, seed=1)
    settings = [(0.0, 0.0), (0.5, 0.0), (0.0, -1.5), (2.0, 1.0)]  # (frequency, presence)
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in settings]
    expected = logits.clone()
    for row, (frequency, presence) in enumerate(settings):
        outputs = token_ids[row][len(token_ids[row]) - num_outputs[row] :]
        for token, count in Counter(outputs).items():
            expected[row, token] -= frequency * count + presence
    torch.testing.assert_close(apply_penalties(logits, params, num_outputs, token_ids), expected)


def test_repetition_penalty_applies_before_frequency_and_presence() -> None:
    logits = random_logits(1, seed=2)
    token_ids, num_outputs = [[1, 2, 3, 3, 4, 4, 4]], [4]
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor(token_ids), logits.clone())
    for token, count in Counter(token_ids[0][3:]).items():
        expected[0, token] -= 0.5 * count + 0.25
    torch.testing.assert_close(apply_penalties(logits, params, num_outputs, token_ids), expected)


def test_penalties_apply_before_top_k_and_temperature() -> None:
    logits = random_logits(8, seed=3)
    token_ids = [[int(row.argmax())] * 3 for row in logits]  # every row repeats its own argmax
    params = [SamplingParams(temperature=1.7, top_k=1, frequency_penalty=2.0, seed=5)] * 8
    penalised = apply_penalties(logits, params, [3] * 8, token_ids)
    assert Sampler(0, CPU).sample(logits, params, [3] * 8, token_ids) == penalised.argmax(-1).tolist()
    assert penalised.argmax(-1).tolist() != logits.argmax(-1).tolist()


def test_sampler_without_token_ids_rejects_rows_with_penalties() -> None:
    with pytest.raises(ValueError, match="token_ids"):
        Sampler(0, CPU).sample(random_logits(1), [SamplingParams(presence_penalty=1.0)], [0])


def test_min_tokens_masks_eos_even_with_ignore_eos_and_stop_ids_until_reached() -> None:
    eos, stop = 3, 5
    logits = torch.zeros(4, VOCAB)
    logits[:, eos], logits[:, stop] = 10.0, 9.0  # [rows, vocab] the two stop tokens dominate
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(stop,)),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(stop,), ignore_eos=True),
        SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=(stop,), seed=1),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(stop, VOCAB + 7)),  # out of vocab: ignored
    ]
    sampler = Sampler(0, CPU, eos_token_ids=(eos,))
    for index in (0, 1):
        tokens = sampler.sample(logits, params, [index] * 4)
        assert not {eos, stop} & set(tokens), f"a stop token was sampled as output token {index} of min_tokens 2"
    assert sampler.sample(logits[:2], params[:2], [2, 2]) == [eos, eos]
    assert sampler.sample(logits[:1], [GREEDY], [0]) == [eos], "min_tokens 0 must not mask EOS"


def test_feature_rows_leave_plain_rows_and_the_input_logits_unchanged() -> None:
    plain = [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, seed=11, top_p=0.9)]
    featured = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8, logprobs=2),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(4,)),
    ]
    logits = random_logits(5, seed=4)
    token_ids, _ = histories(5, seed=4)
    alone = Sampler(9, CPU).sample(logits[:3], plain, [1] * 3, token_ids[:3])
    before = logits.clone()
    order = [3, 0, 1, 4, 2]  # feature rows first and between the plain ones
    params = [featured[0], *plain[:2], featured[1], plain[2]]
    mixed = Sampler(9, CPU).sample(logits[order], params, [1] * 5, [token_ids[i] for i in order])
    assert [mixed[1], mixed[2], mixed[4]] == alone, "rows without features changed their tokens in a mixed batch"
    assert torch.equal(logits, before), "sampling modified the caller's logits"


def test_logprobs_are_raw_log_softmax_sorted_top_n_and_zero_gives_only_the_sampled_token() -> None:
    logits = random_logits(3, seed=5)
    params = [SamplingParams(logprobs=4, repetition_penalty=2.0), GREEDY, SamplingParams(logprobs=0)]
    tokens = [7, 8, 9]
    result = compute_logprobs(logits, params, tokens)
    assert set(result) == {0, 2}, "a row without logprobs got logprobs"
    reference = logits.log_softmax(-1)  # [rows, vocab]
    values, ids = reference[0].topk(4)
    assert result[0].token_id == 7 and result[0].logprob == pytest.approx(reference[0, 7].item())
    assert [t for t, _ in result[0].top] == ids.tolist()
    assert [v for _, v in result[0].top] == pytest.approx(values.tolist())
    assert (result[2].token_id, result[2].top) == (9, ()) and result[2].logprob == pytest.approx(reference[2, 9].item())


# -- ModelRunner ---------------------------------------------------------------------------------


def test_execute_logprobs_equal_log_softmax_of_compute_logits(mha_model_dir: Path) -> None:
    reference, runner = ModelRunner(worker_config(mha_model_dir)), ModelRunner(worker_config(mha_model_dir))
    sampling = {
        "greedy5": SamplingParams(temperature=0.0, logprobs=5),
        "seeded0": SamplingParams(temperature=1.0, seed=3, logprobs=0),
        "penalised3": SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.9, frequency_penalty=1.0),
        "none": GREEDY,
    }
    news = tuple(NewRequestData(rid, tuple(PROMPTS[i]), p, (i,)) for i, (rid, p) in enumerate(sampling.items()))
    plans = [StepPlan(0, news)] + [StepPlan(s, cached_requests=tuple(map(CachedRequestData, sampling))) for s in (1, 2)]
    for plan in plans:
        logits = reference.compute_logits(plan)
        expected_tokens = reference.sample(logits)
        out = runner.execute(plan)
        assert out.sampled == expected_tokens
        assert set(out.logprobs) == {"greedy5", "seeded0", "penalised3"}
        for rid, lp in out.logprobs.items():
            raw = logits[rid].log_softmax(-1)  # [vocab]
            n = sampling[rid].logprobs
            assert lp.token_id == out.sampled[rid]
            assert lp.logprob == pytest.approx(raw[lp.token_id].item(), abs=1e-6)
            assert [t for t, _ in lp.top] == (raw.topk(n).indices.tolist() if n else []), f"{rid}: wrong top ids"
            assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:])), f"{rid}: top logprobs not sorted"
        assert out.sampled["greedy5"] == out.logprobs["greedy5"].top[0][0], "greedy token is not the top-1"


def test_penalties_count_output_tokens_after_a_preemption_resume(mha_model_dir: Path) -> None:
    sampling = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=1.0, repetition_penalty=1.2)
    prompt = tuple(PROMPTS[3])

    def generate(preempt_at: int | None) -> list[int]:
        runner = ModelRunner(worker_config(mha_model_dir))
        tokens = [runner.execute(StepPlan(0, (NewRequestData("r", prompt, sampling, (0, 1)),))).sampled["r"]]
        for step in range(1, 10):
            if step == preempt_at:
                resumed = NewRequestData("r", prompt + tuple(tokens), sampling, (2, 3), len(tokens))
                plan = StepPlan(step, (resumed,), freed_request_ids=("r",))
            else:
                plan = StepPlan(step, cached_requests=(CachedRequestData("r"),))
            tokens.append(runner.execute(plan).sampled["r"])
        return tokens

    assert generate(preempt_at=5) == generate(preempt_at=None)


# -- scheduler core ------------------------------------------------------------------------------


def hf_greedy_with_penalties(model: torch.nn.Module, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    """Plain reference: transformers logits, its repetition processor, then the OpenAI formula, argmax."""
    tokens = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[:, -1].float()  # [1, vocab]
        logits = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([tokens]), logits)
        for token, count in Counter(tokens[len(prompt) :]).items():
            logits[0, token] -= p.frequency_penalty * count + p.presence_penalty
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def test_greedy_penalties_through_local_engine_match_transformers_reference(default_model_dir: Path) -> None:
    n = 16
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    engine = LocalEngine(worker_config(default_model_dir))
    plain = [g.token_ids for g in engine.generate(PROMPTS, greedy)]
    prompts = [*PROMPTS, PROMPTS[0] + plain[0][:12]]  # the last holds its own continuation: not output tokens
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, repetition_penalty=0.8, frequency_penalty=-0.5),
        greedy,
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0),
    ]
    ours = [g.token_ids for g in engine.generate(prompts, params)]
    assert ours[3] == plain[3], "a row without features changed its tokens beside rows with penalties"
    assert all(ours[i] != plain[i] for i in range(3)), "a penalty changed nothing: the test proves little"
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    for i, p in enumerate(params):
        assert ours[i] == hf_greedy_with_penalties(model, prompts[i], n, p), f"prompt {i} with {p}"


def test_min_tokens_holds_back_greedy_stop_token_and_eos_through_local_engine(
    default_model_dir: Path, tmp_path: Path
) -> None:
    prompt = PROMPTS[0]
    engine = LocalEngine(worker_config(default_model_dir))
    first = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))[0].token_ids[0]
    stop_first = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(first,))
    stopped = engine.generate([prompt], stop_first)[0]
    assert (stopped.token_ids, stopped.finish_reason) == ([first], FinishReason.STOP)
    held = engine.generate([prompt], replace(stop_first, min_tokens=4))[0]
    assert first not in held.token_ids[:4] and len(held.token_ids) > 4, held

    eos_dir = tmp_path / "eos-is-first-token"  # the same model, with its greedy first token as an EOS id
    eos_dir.mkdir()
    for path in default_model_dir.iterdir():
        if path.name != "generation_config.json":
            (eos_dir / path.name).symlink_to(path)
    (eos_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    eos_engine = LocalEngine(worker_config(eos_dir))
    assert eos_engine.generate([prompt], SamplingParams(temperature=0.0))[0].token_ids == [first]
    for ignore_eos in (False, True):
        out = eos_engine.generate([prompt], SamplingParams(temperature=0.0, min_tokens=5, ignore_eos=ignore_eos))[0]
        assert first not in out.token_ids[:5], f"EOS sampled before min_tokens (ignore_eos={ignore_eos})"


def test_logprobs_reach_request_outputs_aligned_with_new_tokens(default_model_dir: Path) -> None:
    engine = LocalEngine(worker_config(default_model_dir))
    engine.scheduler.add_request("lp", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, logprobs=2))
    engine.scheduler.add_request("plain", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=5))
    outputs: dict[str, list[RequestOutput]] = {"lp": [], "plain": []}
    while engine.scheduler.has_work():
        plan = engine.scheduler.schedule()
        for out in engine.scheduler.update_from_output(plan, engine.runner.execute(plan)).outputs:
            outputs[out.request_id].append(out)
    assert len(outputs["lp"]) == 5 and all(out.logprobs == () for out in outputs["plain"])
    for out in outputs["lp"]:
        assert len(out.logprobs) == 1 and out.logprobs[0].token_id == out.new_token_ids[0]
        assert len(out.logprobs[0].top) == 2 and out.logprobs[0].top[0][0] == out.new_token_ids[0]


def scripted_scheduler(sampling: SamplingParams) -> Scheduler:
    sched = Scheduler(SchedulerConfig(), WorkerInfo("fake", 1, VOCAB, 256, (0,), 4, 64, "cpu", "float32"))
    sched.add_request("r", [1, 2, 3], sampling)
    return sched


def test_scheduler_finishes_on_stop_or_eos_only_after_min_tokens() -> None:
    for stop in (0, 9):  # EOS, then a stop token id
        sched = scripted_scheduler(SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=(9,)))
        finished = []
        for token in (stop, stop, stop):
            plan = sched.schedule()
            result = sched.update_from_output(plan, StepOutput(plan.step_id, {"r": token}))
            finished.append(result.outputs[0].finish_reason)
        assert finished == [None, None, FinishReason.STOP], f"token {stop} with min_tokens 2"


def test_scheduler_rejects_a_step_without_the_logprobs_a_request_asked_for() -> None:
    sched = scripted_scheduler(SamplingParams(logprobs=1))
    plan = sched.schedule()
    with pytest.raises(ValueError, match="logprobs"):
        sched.update_from_output(plan, StepOutput(plan.step_id, {"r": 5}))
    lp = TokenLogprob(5, -0.5, ((5, -0.5),))
    result = sched.update_from_output(plan, StepOutput(plan.step_id, {"r": 5}, logprobs={"r": lp}))
    assert result.outputs[0].logprobs == (lp,)


# -- protobuf edge -------------------------------------------------------------------------------


def test_step_and_request_outputs_with_logprobs_survive_the_protobuf_round_trip() -> None:
    logprobs = {"a": TokenLogprob(5, -0.25, ((5, -0.25), (9, -2.5))), "b": TokenLogprob(7, -3.0)}
    step = StepOutput(step_id=3, sampled={"a": 5, "b": 7, "c": 1}, logprobs=logprobs)
    assert convert.step_output_from_pb(convert.step_output_to_pb(step)) == step
    request = RequestOutput("a", (5,), num_prompt_tokens=3, num_output_tokens=1, logprobs=(logprobs["a"],))
    assert convert.request_output_from_pb("a", convert.request_output_to_pb(request)) == request
    sampling = SamplingParams(
        min_tokens=2, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.1, logprobs=0
    )
    assert convert.sampling_from_pb(convert.sampling_to_pb(sampling)) == sampling


# -- min_p, allowed_token_ids, bad words ---------------------------------------------------------


def test_min_p_matches_a_plain_reference_on_fixed_logits() -> None:
    logits = random_logits(4, seed=6)
    min_p = torch.tensor([0.0, 0.05, 0.3, 1.0])
    filtered = filter_min_p(logits, min_p)
    for row in range(4):
        probs = torch.softmax(logits[row].double(), dim=-1).tolist()
        kept = [t for t in range(VOCAB) if probs[t] >= min_p[row].item() * max(probs)]
        assert torch.isfinite(filtered[row]).nonzero()[:, 0].tolist() == kept, f"row {row}, min_p {min_p[row]}"
        assert torch.equal(filtered[row, kept], logits[row, kept]), "min_p changed a kept logit"
    assert len(kept) == 1 and kept[0] == logits[3].argmax().item(), "min_p 1 keeps only the likeliest token"


def test_min_p_applies_after_temperature_and_one_keeps_only_the_top_token() -> None:
    logits = random_logits(1, seed=7)
    top = logits[0].argmax().item()
    sampler = Sampler(0, CPU)
    for seed in range(20):
        assert sampler.sample(logits, [SamplingParams(temperature=1.5, min_p=1.0, seed=seed)], [0]) == [top]
    probs = (logits[0] / 2.0).softmax(-1)  # [vocab] after temperature 2
    support = {t for t in range(VOCAB) if probs[t] >= 0.2 * probs.max()}
    drawn = {sampler.sample(logits, [SamplingParams(temperature=2.0, min_p=0.2)], [0])[0] for _ in range(300)}
    assert drawn <= support and len(drawn) > 1, (drawn, support)


def test_allowed_token_ids_restrict_greedy_and_sampled_rows() -> None:
    logits = random_logits(3, seed=8)
    allowed = (11, 29)
    expected = [allowed[int(logits[r, allowed[1]] > logits[r, allowed[0]])] for r in range(3)]
    greedy = [SamplingParams(temperature=0.0, allowed_token_ids=allowed)] * 3
    assert Sampler(0, CPU).sample(logits, greedy, [0] * 3) == expected, "greedy: the likelier allowed token"
    sampler = Sampler(1, CPU)
    drawn = [t for _ in range(100) for t in sampler.sample(logits, [SamplingParams(allowed_token_ids=allowed)] * 3,
                                                            [0] * 3)]
    assert set(drawn) == set(allowed), "sampling left the allowed tokens or never drew one of them"


def test_bad_words_ban_a_word_last_token_only_after_its_other_tokens_end_the_output() -> None:
    words = ((7,), (3, 4), (1, 2, 5))
    prompt = [3, 1, 2]  # a bad word's beginning in the prompt does not count
    assert banned_by_bad_words(words, prompt, 0) == {7}
    assert banned_by_bad_words(words, [*prompt, 3], 1) == {7, 4}
    assert banned_by_bad_words(words, [*prompt, 1, 2], 2) == {7, 5}
    assert banned_by_bad_words(words, [*prompt, 1, 2, 9], 3) == {7}
    logits = torch.zeros(2, VOCAB)
    logits[:, 4] = 10.0  # [rows, vocab] token 4 dominates
    params = [SamplingParams(temperature=0.0, bad_words_token_ids=words), GREEDY]
    tokens = Sampler(0, CPU).sample(logits, params, [1, 1], [[*prompt, 3], [*prompt, 3]])
    assert tokens[0] != 4 and tokens[1] == 4, "bad word (3, 4) completed, or a row without bad words was masked"
    with pytest.raises(ValueError, match="token_ids"):
        Sampler(0, CPU).sample(logits[:1], params[:1], [0])


def test_bad_words_are_tokenized_alone_and_after_a_space_as_vllm(default_model_dir: Path) -> None:
    tokenizer = load_tokenizer(default_model_dir)
    # byte-level: " ab" is one token longer than "ab", so only the word alone is kept (vLLM's rule)
    assert bad_words_token_ids(tokenizer, ["ab", " c"]) == ((97, 98), (99,))


def test_allowed_token_ids_and_bad_words_through_local_engine(default_model_dir: Path) -> None:
    n = 24
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    engine = LocalEngine(worker_config(default_model_dir))
    plain = [g.token_ids for g in engine.generate(PROMPTS, greedy)]
    pair = (plain[0][3], plain[0][4])  # a bigram the model generates
    allowed = (plain[1][0], (plain[1][0] + 100) % 256)  # its greedy first token and another byte
    params = [
        replace(greedy, bad_words_token_ids=(pair,)),
        replace(greedy, allowed_token_ids=allowed),
        replace(greedy, bad_words_token_ids=((plain[2][0],), (plain[2][1],))),
        greedy,
    ]
    ours = [g.token_ids for g in engine.generate(PROMPTS, params)]
    assert ours[3] == plain[3], "a row without features changed its tokens beside rows with them"
    assert ours[0] != plain[0] and pair not in set(zip(ours[0], ours[0][1:])), "the bad word was generated"
    assert ours[0][:4] == plain[0][:4], "the bad word changed tokens before its last one could be generated"
    assert set(ours[1]) <= set(allowed) and ours[1] != plain[1], f"allowed_token_ids {allowed}: {ours[1]}"
    assert not {plain[2][0], plain[2][1]} & set(ours[2]), "a one-token bad word was generated"
