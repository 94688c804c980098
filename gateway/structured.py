"""Structured outputs: the llguidance grammar a request's constraint fields stand for, and its validation
against the served model's tokenizer.

Every constraint (a JSON schema, any JSON object, a regex, a choice of strings, a Lark or GBNF grammar) becomes
one llguidance grammar string, SamplingParams.structured_grammar, which the gpu_worker compiles with the same
tokenizer and masks with at each step. The gateway compiles it first, so that a grammar that does not compile is
an InvalidArgument naming the API field it came from, before the request reaches the engine; validations are
cached by grammar text, so a repeated schema costs one dictionary look-up.
"""

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from llguidance import LLMatcher, LLTokenizer, grammar_from
from tokenizers import Tokenizer

from apex_serve.errors import InvalidArgument

ANY_JSON_OBJECT = LLMatcher.grammar_from_json_schema({"type": "object"})


def json_schema_grammar(field: str, schema: str | dict[str, Any]) -> str:
    """A JSON schema, as an object or as its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(field, f"is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(field, f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        return LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise InvalidArgument(field, f"is not a JSON schema: {exc}") from None


def regex_grammar(field: str, pattern: str) -> str:
    if not pattern:
        raise InvalidArgument(field, "must not be empty")
    return LLMatcher.grammar_from_regex(pattern)


def choice_grammar(field: str, choices: Sequence[str]) -> str:
    """Exactly one of the strings."""
    if not choices:
        raise InvalidArgument(field, "must hold at least one choice")
    if any(not c for c in choices):
        raise InvalidArgument(field, "choices must not be empty strings")
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def cfg_grammar(field: str, text: str) -> str:
    """A Lark grammar, or a GBNF (llama.cpp) one, which llguidance turns into Lark."""
    if not text.strip():
        raise InvalidArgument(field, "must not be empty")
    try:
        return grammar_from("grammar", text)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None


class GrammarChecker:
    """Compiles grammars with the served model's tokenizer; the outcome of the last cache_size grammars is kept.

    The llguidance tokenizer is built on first use (about a second for a 128k vocabulary), off the event loop like
    every validation that misses the cache."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 512
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids) or None
        self._cache_size = cache_size
        self._errors: OrderedDict[str, str] = OrderedDict()  # grammar text -> "" (compiles) or llguidance's message
        self._lock = threading.Lock()
        self._ll_tokenizer: LLTokenizer | None = None

    def _llguidance_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = LLTokenizer(
                    self._tokenizer.to_str(), n_vocab=self._vocab_size, eos_token=self._eos
                )
            return self._ll_tokenizer

    def _cached(self, grammar: str) -> str | None:
        with self._lock:
            error = self._errors.get(grammar)
            if error is not None:
                self._errors.move_to_end(grammar)
            return error

    def _compile(self, grammar: str) -> str:
        """llguidance's error message, or "" when the grammar compiles."""
        error = LLMatcher.validate_grammar(grammar, self._llguidance_tokenizer())
        with self._lock:
            self._errors[grammar] = error
            while len(self._errors) > self._cache_size:
                self._errors.popitem(last=False)
        return error

    async def check(self, field: str, grammar: str) -> None:
        """InvalidArgument naming field when the grammar does not compile; a cache miss compiles in a thread."""
        if not grammar:
            return
        error = self._cached(grammar)
        if error is None:
            error = await asyncio.to_thread(self._compile, grammar)
        if error:
            raise InvalidArgument(field, f"does not compile: {error.strip()}")
