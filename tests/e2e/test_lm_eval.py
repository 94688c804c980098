"""lm-evaluation-harness, unmodified through its CLI, against the whole stack over the OpenAI HTTP API: its
`local-completions` model scores a multiple-choice and a rolling log-likelihood task (tests/e2e/lm_eval_tasks) with
batched token-id prompts, `echo`, `max_tokens` 1 and `logprobs` 1. Every example's log-likelihood equals the one
transformers computes on the same tokens (fp32) within 1e-4, its is_greedy is transformers' argmax, and the accuracy
lm-eval reports is the one those log-likelihoods give, at batch sizes 1 and 4. The stack runs gpu-only (no profile to
measure): prompt logprobs on the CPU pool and in the hybrid modes are checked in tests/services/test_prompt_logprobs.py."""

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from apex_tools.launcher import Stack
from conftest import running_stack

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ("apex_choice", "apex_rolling")
# lm-eval's max_length: requests of at most MAX_LENGTH - 1 tokens, rolling windows of MAX_LENGTH - 2 scored tokens,
# so each rolling document (340-361 bytes, one token a byte) spans three windows.
MAX_LENGTH = 128
# Tokens per iteration: prompts of up to 127 tokens are prefilled in chunks, their prompt logprobs over several steps.
MAX_NUM_BATCHED_TOKENS = 64
TOLERANCE = 1e-4
BATCH_SIZES = (1, 4)


@dataclass(frozen=True)
class Scored:
    """A log-likelihood and is_greedy, from lm-eval's samples file or from transformers."""

    loglikelihood: float
    is_greedy: bool


@dataclass(frozen=True)
class Run:
    """One lm-eval run: its aggregated results and each task's samples in document order."""

    results: dict[str, dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def stack(mha_model_dir: Path) -> Iterator[Stack]:
    with running_stack(mha_model_dir, policy="gpu-only", max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS) as s:
        yield s


class Reference:
    """transformers' LlamaForCausalLM (fp32) and the Hugging Face tokenizer lm-eval loads from the same directory."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.inference_mode()
    def score(self, context: list[int], continuation: list[int]) -> Scored:
        """The summed log-probability of continuation given context, and whether each token is the argmax."""
        ids = torch.tensor([context + continuation])
        logprobs = torch.log_softmax(self.model(ids).logits[0].double(), dim=-1)  # [tokens, vocab]
        positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
        targets = torch.tensor(continuation)
        chosen = logprobs[positions, targets]  # [continuation]
        greedy = bool((logprobs[positions].argmax(dim=-1) == targets).all())
        return Scored(float(chosen.sum()), greedy)

    def choice(self, context: str, continuation: str) -> Scored:
        """lm-eval's causal pair encoding: trailing spaces of the context move to the continuation, whose tokens are
        those of the whole text past the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.encode(context)
        whole = self.encode(context + continuation)
        assert len(whole) < MAX_LENGTH, "a choice request would be left-truncated; keep the documents short"
        return self.score(context_ids, whole[len(context_ids):])

    def rolling(self, text: str) -> float:
        """The sum over lm-eval's disjoint rolling windows of the text (the BOS token as the first context)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = get_rolling_token_windows(
            token_list=self.encode(text), prefix_token=self.tokenizer.bos_token_id, max_seq_len=MAX_LENGTH - 2,
            context_len=1,
        )
        return sum(self.score(*make_disjoint_window(w)).loglikelihood for w in windows)


@pytest.fixture(scope="module")
def reference(mha_model_dir: Path) -> Reference:
    return Reference(mha_model_dir)


def _served_model(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.config.http_port}/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


def _lm_eval(stack: Stack, model_dir: Path, batch_size: int, out: Path) -> Run:
    """Runs lm-eval's CLI from the repository root, offline, and reads back its results and samples."""
    model_args = ",".join([
        f"model={_served_model(stack)}",
        f"base_url=http://127.0.0.1:{stack.config.http_port}/v1/completions",
        f"tokenizer={model_dir}",
        "tokenizer_backend=huggingface",
        "num_concurrent=1",
        "max_retries=1",
        f"max_length={MAX_LENGTH}",
    ])
    command = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
        "--tasks", ",".join(TASKS), "--include_path", str(TASKS_DIR.relative_to(REPO_ROOT)),
        "--batch_size", str(batch_size), "--log_samples", "--output_path", str(out),
    ]
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"), "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("OPENAI_API_KEY", None)
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"lm_eval exited {done.returncode}:\n{done.stderr[-4000:]}"
    (results_file,) = out.glob("*/results_*.json")
    samples = {}
    for task in TASKS:
        (samples_file,) = out.glob(f"*/samples_{task}_*.jsonl")
        lines = samples_file.read_text(encoding="utf-8").splitlines()
        samples[task] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    return Run(json.loads(results_file.read_text())["results"], samples)


@pytest.fixture(scope="module")
def runs(stack: Stack, mha_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Run]:
    """One lm-eval run per batch size, side by side on the one stack: each spends most of its time indexing lm-eval's
    built-in task configs on its own core before its first request."""
    outs = [tmp_path_factory.mktemp("lm_eval") for _ in BATCH_SIZES]
    with ThreadPoolExecutor(len(BATCH_SIZES)) as pool:
        done = pool.map(lambda b, out: _lm_eval(stack, mha_model_dir, b, out), BATCH_SIZES, outs)
        return dict(zip(BATCH_SIZES, done, strict=True))


@pytest.fixture(params=BATCH_SIZES, ids=lambda b: f"batch_size={b}")
def run(request: pytest.FixtureRequest, runs: dict[int, Run]) -> Run:
    return runs[request.param]


def _arguments(sample: dict[str, Any]) -> list[list[str]]:
    """The request arguments of a logged sample, one list per request ((context, continuation) or (text,))."""
    return [[args[f"arg_{j}"] for j in range(len(args))] for args in sample["arguments"].values()]


def test_multiple_choice_loglikelihoods_and_is_greedy_equal_transformers(run: Run, reference: Reference) -> None:
    samples = run.samples["apex_choice"]
    assert len(samples) == 6
    correct, greedy_choices = 0, 0
    for sample in samples:
        served = [Scored(float(ll), greedy == "True") for ((ll, greedy),) in sample["resps"]]
        want = [reference.choice(context, continuation) for context, continuation in _arguments(sample)]
        assert len(served) == len(want) == len(sample["doc"]["choices"])
        for i, (got, expected) in enumerate(zip(served, want, strict=True)):
            assert abs(got.loglikelihood - expected.loglikelihood) <= TOLERANCE, (
                f"doc {sample['doc_id']} choice {i}: log-likelihood {got.loglikelihood} != transformers' "
                f"{expected.loglikelihood}")
            assert got.is_greedy == expected.is_greedy, f"doc {sample['doc_id']} choice {i}: is_greedy differs"
        greedy_choices += sum(got.is_greedy for got in served)
        best = max(range(len(want)), key=lambda i: want[i].loglikelihood)
        correct += best == sample["doc"]["label"]
        assert sample["acc"] == float(best == sample["doc"]["label"]), f"doc {sample['doc_id']}: acc differs"
    assert greedy_choices > 0, "no choice was greedy: the last document's choice \"X\" is the model's argmax"
    assert run.results["apex_choice"]["acc,none"] == pytest.approx(correct / len(samples))


def test_rolling_loglikelihoods_equal_transformers_over_the_windows(run: Run, reference: Reference) -> None:
    samples = run.samples["apex_rolling"]
    assert len(samples) == 3
    for sample in samples:
        ((text,),) = _arguments(sample)
        assert len(reference.encode(text)) > 2 * (MAX_LENGTH - 2), "a document should span several windows"
        ((served,),) = sample["resps"]
        want = reference.rolling(text)
        assert abs(float(served) - want) <= TOLERANCE, (
            f"doc {sample['doc_id']}: rolling log-likelihood {served} != transformers' {want}")
    assert run.results["apex_rolling"]["byte_perplexity,none"] > 1.0
