"""The whole stack with a device KV pool of 8 blocks (128 tokens) under every policy: it starts, profiles within that
pool (neo profiles it into a fresh directory, apex reuses the profile) and serves 32 concurrent requests whose
prompts run from 16 to 1,500 tokens, with chunked prefill (512 tokens per iteration). Greedy tokens equal
transformers'. Under gpu-only a request that cannot fit the device pool is refused with INVALID_ARGUMENT naming the
pool's size; the hybrid policies serve it from the CPU pool. A prompt of max_model_len - 16 tokens is served exactly
in chunks of 512, from the accelerator's pool and from the CPU pool.

The model is a small random LLaMA (hidden 128, 2 layers, GQA) with a context of 2,048 tokens, so that prefilling
every prompt here takes seconds on one core."""

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from apex_tools.bench.faults import StreamRecord, generate, scheduler_address
from apex_tools.default_model import RandomLlamaSpec, write_random_llama
from apex_tools.launcher import Stack
from conftest import running_stack

SPEC = RandomLlamaSpec(
    hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
    max_position_embeddings=2048, name="test-long-context-llama",
)
MAX_MODEL_LEN = SPEC.max_position_embeddings
BLOCK_SIZE = 16
DEVICE_BLOCKS = 8
DEVICE_POOL_TOKENS = DEVICE_BLOCKS * BLOCK_SIZE  # 128
BUDGET = 512  # --max-num-batched-tokens
MAX_TOKENS = 8
NUM_REQUESTS = 32
SHORTEST, LONGEST = 16, 1500
# 16 .. 1,500 tokens, geometric (more short prompts than long ones); none within a few tokens of the device pool's
# size, so whether a request fits does not hang on how its last token's KV is counted
PROMPT_LENS = [round(SHORTEST * (LONGEST / SHORTEST) ** (i / (NUM_REQUESTS - 1))) for i in range(NUM_REQUESTS)]
LONG_PROMPT_LEN = MAX_MODEL_LEN - 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
STREAM_TIMEOUT_S = 240.0


def _fits_device_pool(prompt_len: int) -> bool:
    return prompt_len + MAX_TOKENS <= DEVICE_POOL_TOKENS


def _text(length: int, seed: int) -> str:
    """ASCII text of length - 1 bytes: length tokens with the byte-level tokenizer's <s>."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(length - 1))


PROMPTS = [_text(n, seed=i) for i, n in enumerate(PROMPT_LENS)]
LONG_PROMPT = _text(LONG_PROMPT_LEN, seed=NUM_REQUESTS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seed 8: over every greedy step here the top two logits of transformers' reference differ by 3e-3 or more, far
    # above what summing attention in another order (chunks, the CPU pool) changes in fp32
    return write_random_llama(tmp_path_factory.mktemp("models") / SPEC.name, SPEC, seed=8)


@pytest.fixture(scope="module")
def prompt_ids(model_dir: Path) -> list[list[int]]:
    """The token ids the gateway makes of PROMPTS and, last, LONG_PROMPT."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = [tokenizer.encode(p).ids for p in [*PROMPTS, LONG_PROMPT]]
    assert [len(i) for i in ids] == [*PROMPT_LENS, LONG_PROMPT_LEN], "a prompt's token count is not its length"
    return ids


@pytest.fixture(scope="module")
def reference(model_dir: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy MAX_TOKENS tokens of every prompt (EOS ignored), in fp32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids])  # [1, prompt tokens]
            tokens = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                    max_new_tokens=MAX_TOKENS, pad_token_id=0)
            out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Empty at first: the first hybrid stack (neo) profiles the 8-block pool into it, apex's reuses that profile."""
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module", params=["gpu-only", "neo", "apex"])
def small_pool_stack(request: pytest.FixtureRequest, model_dir: Path, profile_dir: Path) -> Iterator[Stack]:
    """The stack with an 8-block device pool under the policy."""
    with running_stack(model_dir, policy=request.param, num_kv_blocks=DEVICE_BLOCKS,
                       max_num_batched_tokens=BUDGET, profile_dir=str(profile_dir)) as stack:
        yield stack


@pytest.fixture(scope="module")
def chunked_gpu_only_stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """gpu-only with a device pool that holds a whole context, and 512 tokens per iteration."""
    with running_stack(model_dir, policy="gpu-only", max_num_batched_tokens=BUDGET,
                       profile_dir=str(tmp_path_factory.mktemp("profiles"))) as stack:
        yield stack


async def _serve(stack: Stack, prompts: list[str]) -> list[StreamRecord]:
    async with grpc.aio.insecure_channel(stack.config.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        return list(await asyncio.gather(*(generate(stub, p, GREEDY, timeout_s=STREAM_TIMEOUT_S) for p in prompts)))


async def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    async with grpc.aio.insecure_channel(scheduler_address(stack)) as channel:
        return await scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def _assert_exact(record: StreamRecord, want: list[int], what: str) -> None:
    assert record.completed, f"{what}: ended {record.error_code}: {record.error_message}"
    assert record.token_ids == want, f"{what}: tokens differ from transformers'"
    assert record.completion_tokens == MAX_TOKENS, f"{what}: {record.completion_tokens} tokens"


def _assert_refused_naming_the_device_pool(record: StreamRecord, what: str) -> None:
    assert record.error_code == "INVALID_ARGUMENT", f"{what}: ended {record.error_code or 'complete'}"
    message = record.error_message
    assert message.startswith(("prompt", "max_tokens")), f"{what}: the field is not named: {message}"
    assert f"holds {DEVICE_POOL_TOKENS}" in message, f"{what}: the device pool's size is not named: {message}"


async def test_an_8_block_device_pool_serves_32_concurrent_prompts_of_16_to_1500_tokens_exactly(
    small_pool_stack: Stack, reference: list[list[int]],
) -> None:
    policy = small_pool_stack.config.policy
    records = await _serve(small_pool_stack, PROMPTS)
    for i, (record, want, length) in enumerate(zip(records, reference[:NUM_REQUESTS], PROMPT_LENS, strict=True)):
        what = f"{policy}, request {i} ({length} prompt tokens)"
        if policy == "gpu-only" and not _fits_device_pool(length):
            _assert_refused_naming_the_device_pool(record, what)
        else:
            _assert_exact(record, want, what)
    stats = await _stats(small_pool_stack)
    assert stats.num_total_blocks == DEVICE_BLOCKS
    assert stats.num_running == stats.num_waiting == 0, "a request was left in the scheduler"
    assert stats.num_free_blocks == stats.num_total_blocks, "device KV blocks leaked"
    assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks, "CPU KV blocks leaked"
    if policy != "gpu-only":
        assert stats.num_finished >= NUM_REQUESTS
        assert stats.iterations_by_mode["async_overlap"] + stats.iterations_by_mode["asym_pipeline"] > 0, (
            f"{policy} never ran a request from the CPU pool: {dict(stats.iterations_by_mode)}")


async def test_a_prompt_of_max_model_len_less_16_is_served_exactly_in_chunks_of_512(
    small_pool_stack: Stack, reference: list[list[int]],
) -> None:
    """From the CPU pool under the hybrid policies (the device pool holds 128 tokens); refused under gpu-only."""
    policy = small_pool_stack.config.policy
    [record] = await _serve(small_pool_stack, [LONG_PROMPT])
    if policy == "gpu-only":
        _assert_refused_naming_the_device_pool(record, f"gpu-only, {LONG_PROMPT_LEN} prompt tokens")
    else:
        _assert_exact(record, reference[-1], f"{policy}, {LONG_PROMPT_LEN} prompt tokens")
        stats = await _stats(small_pool_stack)
        assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks > 0, "CPU KV blocks leaked"


async def test_a_prompt_of_max_model_len_less_16_is_served_exactly_in_chunks_of_512_from_the_device_pool(
    chunked_gpu_only_stack: Stack, reference: list[list[int]],
) -> None:
    [record] = await _serve(chunked_gpu_only_stack, [LONG_PROMPT])
    _assert_exact(record, reference[-1], f"gpu-only, {LONG_PROMPT_LEN} prompt tokens")
    stats = await _stats(chunked_gpu_only_stack)
    assert stats.num_free_blocks == stats.num_total_blocks, "device KV blocks leaked"
    prefill_steps = [it for it in stats.recent_iterations if it.num_prefills]
    assert len(prefill_steps) >= -(-LONG_PROMPT_LEN // BUDGET), (
        f"{len(prefill_steps)} prefill iterations: the prompt was not split into chunks of {BUDGET}")
    over = [it.step_id for it in stats.recent_iterations if it.prefill_tokens + it.gpu_rows + it.cpu_rows > BUDGET]
    assert not over, f"iterations {over} computed more than --max-num-batched-tokens {BUDGET} tokens"
