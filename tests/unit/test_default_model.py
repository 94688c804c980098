"""The default random LLaMA: deterministic files, a byte tokenizer and a model transformers can load."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apex_tools.default_model import (
    BENCH_SPEC,
    BOS_TOKEN_ID,
    DEFAULT_SPEC,
    EOS_TOKEN_ID,
    RandomLlamaSpec,
    write_random_llama,
)

SMALL_SPEC = RandomLlamaSpec(
    hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, name="test-small"
)


def test_writer_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = write_random_llama(tmp_path / "a", SMALL_SPEC, seed=3)
    second = write_random_llama(tmp_path / "b", SMALL_SPEC, seed=3)
    other = write_random_llama(tmp_path / "c", SMALL_SPEC, seed=4)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), f"{name} differs between two writes"
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_writer_does_not_import_transformers(tmp_path: Path) -> None:
    code = (
        "import sys; from apex_tools.default_model import write_random_llama, RandomLlamaSpec;"
        f"write_random_llama({str(tmp_path)!r}, RandomLlamaSpec(hidden_size=64, intermediate_size=128, num_layers=1,"
        " num_heads=2, num_kv_heads=1)); assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_default_model_writes_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_random_llama(tmp_path, DEFAULT_SPEC)
    assert time.perf_counter() - start < 2.0


def test_specs_have_the_documented_shapes() -> None:
    assert (DEFAULT_SPEC.name, DEFAULT_SPEC.hidden_size, DEFAULT_SPEC.head_dim, DEFAULT_SPEC.num_kv_heads) == (
        "apex-tiny-llama", 512, 64, 2
    )
    assert (BENCH_SPEC.name, BENCH_SPEC.hidden_size, BENCH_SPEC.num_layers, BENCH_SPEC.num_kv_heads) == (
        "apex-bench-llama", 1024, 8, 4
    )
    assert not DEFAULT_SPEC.tie_word_embeddings and not BENCH_SPEC.tie_word_embeddings


def test_config_names_the_llama_architecture_and_special_tokens(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (256, 257, "float32")


@pytest.mark.parametrize("text", ["hello world", "  leading spaces\tand tabs\n", "héllo wörld 日本語 🎉", ""])
def test_tokenizer_round_trips_text_byte_per_token(default_model_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tokenizer(text)["input_ids"]
    assert ids == [BOS_TOKEN_ID, *text.encode("utf-8")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_knows_its_special_tokens(default_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)
    assert tokenizer("a</s>")["input_ids"] == [BOS_TOKEN_ID, ord("a"), EOS_TOKEN_ID]
    assert tokenizer.model_max_length == DEFAULT_SPEC.max_position_embeddings


def test_greedy_continuations_of_different_prompts_differ(default_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    assert model.dtype == torch.float32
    continuations = []
    for prompt in ["Hello, world", "The quick brown fox", "1 2 3 4", "¿Qué tal?"]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24, pad_token_id=EOS_TOKEN_ID
        )
        continuations.append(tuple(out[0, ids.shape[1] :].tolist()))
    assert len(set(continuations)) == len(continuations), "two prompts continue identically"
    for tokens in continuations:
        assert len(set(tokens)) >= 6, f"degenerate continuation {tokens}"
