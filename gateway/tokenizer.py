"""Tokenizer of the served model (Hugging Face `tokenizers`, no transformers) and incremental
detokenization that is exact across multi-byte characters split over tokens."""

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character -> byte map, in which ByteLevel tokenizers spell their vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def bad_words_token_ids(tokenizer: Tokenizer, bad_words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each word's token ids as vLLM finds them: the word (left-stripped) on its own, plus with a leading
    space when that gives a different first token and as many tokens (the word in the middle of a text)."""
    found: list[tuple[int, ...]] = []
    for word in bad_words:
        alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False).ids)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False).ids)
        found.append(alone)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            found.append(spaced)
    return tuple(found)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for. A token whose text is whole characters gives their UTF-8; one that holds part
    of a character (its text decodes to U+FFFD) gives its raw bytes: a SentencePiece byte token <0xNN>, or a
    ByteLevel token spelled in GPT-2's alphabet. Any other token gives the UTF-8 of its text."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if _REPLACEMENT not in text:
        return text.encode()
    piece = tokenizer.id_to_token(token_id) or ""
    if match := _BYTE_FALLBACK.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    alphabet = _byte_level_alphabet()
    if piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return text.encode()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is emitted only up to the last complete character: a trailing U+FFFD means the
    bytes of a character are still arriving, so it is held back until the next token (or
    `flush` at the end). Decoding restarts at the last clean boundary, so the work per token
    stays small and the concatenated deltas equal decoding all ids at once.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids before this index are fully emitted
        self._read = 0  # ids[prefix:read] decode to the text already emitted since prefix

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(emitted) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        """Emits whatever is held back (an incomplete character decodes as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted) :]
