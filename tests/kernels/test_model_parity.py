"""ModelRunner against transformers' LlamaForCausalLM on the same weights (fp32 greedy, per-step logits)."""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from apex_serve.errors import InvalidArgument
from apex_serve.types import CachedRequestData, NewRequestData, SamplingParams, StepPlan
from apex_tools.default_model import RandomLlamaSpec, write_random_llama
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_config import load_model_config, parse_model_config
from gpu_worker.model_runner import ModelRunner
from gpu_worker.rope import inverse_frequencies

BLOCK_SIZE = 4
NUM_BLOCKS = 256
NEW_TOKENS = 32
PROMPT_LENS = (3, 5, 8, 13, 17, 24, 31, 40)
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
MODELS = ("mha_model_dir", "gqa_llama3_model_dir")
TIED_SPEC = RandomLlamaSpec(
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    name="test-tied-llama",
)


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(n - 1)] for n in PROMPT_LENS]


def make_runner(model_dir: Path, dtype: str = "float32") -> ModelRunner:
    config = GpuWorkerConfig(
        model_dir=str(model_dir),
        dtype=dtype,
        device="cpu",
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        num_threads=2,
    )
    return ModelRunner(config)


@dataclass
class Tracked:
    prompt: list[int]
    blocks: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # output index -> [vocab]


class Driver:
    """Plays the scheduler: shuffled block ids, one plan per step, freeing and resuming requests."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.free_blocks = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.requests: dict[str, Tracked] = {}
        self.running: list[str] = []
        self.step_id = 0

    def _take(self, request: Tracked, num_tokens: int) -> list[int]:
        needed = (num_tokens - 1) // BLOCK_SIZE + 1 - len(request.blocks)
        new = [self.free_blocks.pop() for _ in range(max(needed, 0))]
        request.blocks.extend(new)
        return new

    def step(
        self, new: dict[str, list[int]] | None = None, free: tuple[str, ...] = (), resume: tuple[str, ...] = ()
    ) -> None:
        for rid in free:
            self.running.remove(rid)
            self.free_blocks.extend(self.requests[rid].blocks)
            self.requests[rid].blocks = []
        cached = []
        for rid in self.running:
            request = self.requests[rid]
            new_blocks = self._take(request, len(request.prompt) + len(request.outputs))
            cached.append(CachedRequestData(rid, tuple(new_blocks)))
        for rid, prompt in (new or {}).items():
            self.requests[rid] = Tracked(prompt=prompt)
        new_requests = []
        for rid in [*(new or {}), *resume]:
            request = self.requests[rid]
            tokens = request.prompt + request.outputs
            blocks = tuple(self._take(request, len(tokens)))
            new_requests.append(NewRequestData(rid, tuple(tokens), GREEDY, blocks, len(request.outputs)))
            self.running.append(rid)
        plan = StepPlan(self.step_id, tuple(new_requests), tuple(cached), freed_request_ids=free)
        self.step_id += 1
        logits = self.runner.compute_logits(plan)
        for rid, row in logits.items():
            self.requests[rid].logits[len(self.requests[rid].outputs)] = row
        for rid, token in self.runner.sample(logits).items():
            self.requests[rid].outputs.append(token)


@dataclass(frozen=True)
class Reference:
    tokens: list[list[int]]  # per prompt: NEW_TOKENS greedy tokens
    logits: list[torch.Tensor]  # per prompt: [NEW_TOKENS, vocab]


def hf_reference(model_dir: Path, prompts: list[list[int]]) -> Reference:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logits = [], []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),  # the prompts may contain pad_token_id
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens.append(out.sequences[0, len(prompt) :].tolist())
        logits.append(torch.stack([step[0] for step in out.logits]).float())
    assert all(len(t) == NEW_TOKENS for t in tokens), "reference stopped early"
    return Reference(tokens, logits)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / TIED_SPEC.name, TIED_SPEC)


@pytest.fixture(scope="module", params=MODELS)
def model_and_reference(request: pytest.FixtureRequest) -> tuple[Path, Reference]:
    model_dir = request.getfixturevalue(request.param)
    return model_dir, hf_reference(model_dir, make_prompts())


def assert_matches(driver: Driver, reference: Reference, names: list[str]) -> None:
    for i, name in enumerate(names):
        request = driver.requests[name]
        n = len(request.outputs)
        assert request.outputs == reference.tokens[i][:n], f"{name}: tokens diverge from transformers"
        for index, row in request.logits.items():
            torch.testing.assert_close(row, reference.logits[i][index], atol=1e-4, rtol=0, msg=f"{name} step {index}")


def test_llama3_rope_frequencies_equal_transformers_and_are_scaled(gqa_llama3_model_dir: Path) -> None:
    raw = json.loads((gqa_llama3_model_dir / "config.json").read_text())
    ours = inverse_frequencies(load_model_config(gqa_llama3_model_dir))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**raw))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    unscaled = inverse_frequencies(parse_model_config({**raw, "rope_scaling": None}))
    assert (ours != unscaled).sum() >= 3, "llama3 scaling should change several frequencies"


def test_rope_parameters_form_parses_like_legacy_rope_scaling(gqa_llama3_model_dir: Path) -> None:
    raw = json.loads((gqa_llama3_model_dir / "config.json").read_text())
    legacy = parse_model_config(raw)
    params = {**raw.pop("rope_scaling"), "rope_theta": raw.pop("rope_theta")}
    assert parse_model_config({**raw, "rope_parameters": params}) == legacy


def decode_together(model_dir: Path) -> tuple[Driver, list[str]]:
    """All prompts prefilled in one step, then decoded together for NEW_TOKENS tokens."""
    driver = Driver(make_runner(model_dir))
    names = [f"r{i}" for i in range(len(PROMPT_LENS))]
    driver.step(new=dict(zip(names, make_prompts())))
    for _ in range(NEW_TOKENS - 1):
        driver.step()
    assert all(len(driver.requests[n].outputs) == NEW_TOKENS for n in names)
    return driver, names


def test_batched_greedy_decode_matches_transformers(model_and_reference: tuple[Path, Reference]) -> None:
    model_dir, reference = model_and_reference
    driver, names = decode_together(model_dir)
    assert_matches(driver, reference, names)


def test_tied_embeddings_decode_matches_transformers(tied_model_dir: Path) -> None:
    driver, names = decode_together(tied_model_dir)
    assert driver.runner.weights.lm_head is driver.runner.weights.embed_tokens
    assert_matches(driver, hf_reference(tied_model_dir, make_prompts()), names)


def test_requests_joining_leaving_and_resuming_mid_batch_match_transformers(
    model_and_reference: tuple[Path, Reference],
) -> None:
    model_dir, reference = model_and_reference
    prompts = make_prompts()
    names = [f"r{i}" for i in range(len(prompts))]
    arrivals = {0: [0, 1, 2], 3: [3], 5: [4, 5], 9: [6], 12: [7]}
    frees = {7: ("r1",), 10: ("r0",)}  # r1 leaves early; r0 is preempted and resumed below
    resumes = {14: ("r0",)}
    driver = Driver(make_runner(model_dir), seed=1)
    for step in range(12 + NEW_TOKENS):
        new = {names[i]: prompts[i] for i in arrivals.get(step, [])}
        finished = tuple(n for n in driver.running if len(driver.requests[n].outputs) >= NEW_TOKENS)
        driver.step(new=new, free=frees.get(step, ()) + finished, resume=resumes.get(step, ()))
    assert_matches(driver, reference, names)
    assert len(driver.requests["r1"].outputs) < NEW_TOKENS
    assert all(len(driver.requests[n].outputs) >= NEW_TOKENS for n in names if n != "r1")


def test_greedy_continuations_vary_across_prompts_and_positions(model_and_reference: tuple[Path, Reference]) -> None:
    _, reference = model_and_reference
    assert len({tuple(t) for t in reference.tokens}) == len(reference.tokens), "two prompts continue identically"
    for tokens in reference.tokens:
        assert len(set(tokens)) >= 8, f"degenerate continuation {tokens}"


def test_bf16_runs_with_finite_logits_close_to_fp32(gqa_llama3_model_dir: Path) -> None:
    prompts = make_prompts()
    news = [NewRequestData(f"r{i}", tuple(p), GREEDY, tuple(range(i * 16, i * 16 + 16))) for i, p in enumerate(prompts)]
    plan = StepPlan(0, tuple(news))
    fp32 = make_runner(gqa_llama3_model_dir).compute_logits(plan)
    bf16_runner = make_runner(gqa_llama3_model_dir, "bfloat16")
    bf16 = bf16_runner.compute_logits(plan)
    agree = 0
    for rid, row in bf16.items():
        assert row.dtype == torch.float32 and row.shape == (bf16_runner.info.vocab_size,)
        assert torch.isfinite(row).all(), rid
        assert (row - fp32[rid]).abs().max() < 0.5, rid
        agree += int(row.argmax() == fp32[rid].argmax())
    assert agree >= len(prompts) - 2
    decode = StepPlan(1, cached_requests=tuple(CachedRequestData(rid) for rid in bf16))
    bf16_runner.sample(bf16)
    assert set(bf16_runner.execute(decode).sampled) == set(bf16)


def test_execute_reports_tokens_timings_and_worker_info(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    plan = StepPlan(7, (NewRequestData("a", (256, 1, 2), GREEDY, (5,)),))
    out = runner.execute(plan)
    assert out.step_id == 7 and set(out.sampled) == {"a"}
    t = out.timings
    assert t.total_ns >= t.prepare_ns + t.forward_ns + t.sample_ns > 0
    info = runner.info
    assert (info.model_name, info.device, info.dtype) == (mha_model_dir.name, "cpu", "float32")
    assert (info.num_kv_blocks, info.block_size, info.eos_token_ids) == (NUM_BLOCKS, BLOCK_SIZE, (257,))


def test_unknown_cached_request_is_rejected_naming_it(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    with pytest.raises(InvalidArgument, match="ghost"):
        runner.execute(StepPlan(0, cached_requests=(CachedRequestData("ghost"),)))


def test_block_table_too_short_is_rejected_naming_the_request(mha_model_dir: Path) -> None:
    runner = make_runner(mha_model_dir)
    with pytest.raises(InvalidArgument, match="short-one"):
        runner.execute(StepPlan(0, (NewRequestData("short-one", tuple(range(BLOCK_SIZE + 1)), GREEDY, (0,)),)))
    runner.execute(StepPlan(1, (NewRequestData("full", tuple(range(BLOCK_SIZE)), GREEDY, (0,)),)))
    with pytest.raises(InvalidArgument, match="full"):
        runner.execute(StepPlan(2, cached_requests=(CachedRequestData("full"),)))


def rewrite_checkpoint(
    src: Path, dst: Path, config_changes: dict, extra: dict[str, torch.Tensor], num_shards: int = 1
) -> Path:
    """Copy of a model directory with config changes, extra tensors, and the weights split into shards."""
    dst.mkdir()
    config = {**json.loads((src / "config.json").read_text()), **config_changes}
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {**load_file(src / "model.safetensors"), **extra}
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[shard::num_shards]
        save_file({name: tensors[name] for name in part}, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def attention_biases(num_layers: int, hidden: int, kv_size: int, with_o: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    sizes = {"q": hidden, "k": kv_size, "v": kv_size, **({"o": hidden} if with_o else {})}
    return {
        f"model.layers.{i}.self_attn.{x}_proj.bias": torch.randn(n, generator=generator) * 0.5
        for i in range(num_layers)
        for x, n in sizes.items()
    }


@pytest.mark.parametrize("variant", ["sharded", "llama_attention_bias", "qwen2_qkv_bias"])
def test_checkpoint_variants_match_transformers_forward(
    gqa_llama3_model_dir: Path, tmp_path: Path, variant: str
) -> None:
    raw = json.loads((gqa_llama3_model_dir / "config.json").read_text())
    layers, hidden = raw["num_hidden_layers"], raw["hidden_size"]
    kv_size = raw["num_key_value_heads"] * raw["head_dim"]
    changes, extra = {}, {}
    if variant == "llama_attention_bias":
        changes, extra = {"attention_bias": True}, attention_biases(layers, hidden, kv_size, with_o=True)
    if variant == "qwen2_qkv_bias":
        changes = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_scaling": None}
        extra = attention_biases(layers, hidden, kv_size, with_o=False)
    model_dir = rewrite_checkpoint(gqa_llama3_model_dir, tmp_path / variant, changes, extra, num_shards=3)
    driver = Driver(make_runner(model_dir))
    prompts = make_prompts()[:3]
    driver.step(new={f"r{i}": p for i, p in enumerate(prompts)})
    for _ in range(3):
        driver.step()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        request = driver.requests[f"r{i}"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + request.outputs[:-1]])).logits[0, len(prompt) - 1 :]  # [4, vocab]
        for index, row in request.logits.items():
            torch.testing.assert_close(row, logits[index], atol=1e-4, rtol=0, msg=f"{variant} r{i} step {index}")


def test_kv_pool_size_comes_from_the_byte_budget(mha_model_dir: Path) -> None:
    runner = ModelRunner(GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", device_kv_budget_bytes=2**20))
    cfg = runner.model_config
    blocks = 2**20 // (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * cfg.head_dim * 4)
    assert runner.info.num_kv_blocks == blocks
    assert runner.kv_cache.k.shape == (cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, 16, cfg.head_dim)
    assert runner.info.max_model_len == cfg.max_position_embeddings


@pytest.mark.parametrize(
    ("field", "value"),
    [("dtype", "float64"), ("device", "tpu"), ("block_size", 0), ("num_kv_blocks", 0), ("num_threads", 0)],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GpuWorkerConfig(model_dir="/m", **{field: value})
