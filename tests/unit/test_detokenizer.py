"""Incremental detokenization: exact across multi-byte characters split over tokens."""

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from gateway.tokenizer import IncrementalDetokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Tokenizer:
    return load_tokenizer(default_model_dir)


def _stream(tokenizer: Tokenizer, ids: list[int], chunk: int) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas, "".join(deltas)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_deltas_concatenate_to_the_full_decode_with_multibyte_text(tokenizer: Tokenizer, chunk: int) -> None:
    text = "naïve café — 東京 🙂 ok"
    ids = tokenizer.encode(text).ids
    deltas, joined = _stream(tokenizer, ids, chunk)
    assert joined == text
    assert all("\ufffd" not in d for d in deltas), "a half character was emitted"


def test_a_character_split_over_tokens_is_held_until_complete(tokenizer: Tokenizer) -> None:
    euro = tokenizer.encode("€", add_special_tokens=False).ids
    assert len(euro) == 3, "the byte-level tokenizer gives one token per byte"
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(euro[:1]) == ""
    assert detok.push(euro[1:2]) == ""
    assert detok.push(euro[2:]) == "€"


def test_random_bytes_stream_equals_decoding_all_at_once(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(258) for _ in range(rng.randrange(1, 40))]
        _, joined = _stream(tokenizer, ids, rng.randrange(1, 5))
        assert joined == tokenizer.decode(ids, skip_special_tokens=True)
