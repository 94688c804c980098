"""Structured outputs on the worker: an llguidance matcher per constrained request, the token bitmask of a step's
constrained rows, and its application to their logits.

A grammar is compiled once into a matcher in its start state, kept in an LRU cache, and each request gets a deep
copy: copying costs about 0.5 us against about 300 us to build a matcher (32k-token BPE vocabulary, a small JSON
schema), and the copy shares the compiled lexer, so its first mask costs about 7 us instead of 300 us.
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 64
_BITS = 32  # tokens per bitmask word


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // _BITS)


def token_bitmask(tokens: Sequence[int], num_words: int) -> torch.Tensor:
    """[num_words] int32 with the bits of tokens set (bit t % 32 of word t // 32, as llguidance writes them)."""
    bits = np.zeros(num_words * _BITS, dtype=bool)
    bits[list(tokens)] = True
    return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").astype(np.int32))


class GrammarError(ValueError):
    """The worker cannot build a matcher: no usable tokenizer in the model directory."""


class GrammarCompiler:
    """Matchers for grammar strings. The llguidance tokenizer is built from the model directory's tokenizer.json,
    with the model's EOS ids, which a complete grammar lets through: in the background once warm_up is called, else
    on first use."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(t for t in eos_token_ids if t < vocab_size)
        self.cache_size = cache_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> matcher at its start

    def warm_up(self) -> None:
        """Build the tokenizer on a background thread (about a second for a 128k vocabulary), so that the step of the
        first constrained request does not wait for it; a tokenizer that cannot be built is logged, and each
        constrained request then ends as without one."""
        def build() -> None:
            try:
                _ = self.tokenizer
            except GrammarError as exc:
                logger.warning("structured outputs unavailable: %s", exc)

        threading.Thread(target=build, name="llguidance-tokenizer", daemon=True).start()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            return self._tokenizer if self._tokenizer is not None else self._build_tokenizer()

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        path = Path(self.model_dir) / "tokenizer.json"
        try:
            text = path.read_text()
            size = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
            # n_vocab: the model's rows, or more when the tokenizer has tokens past them (never sampled)
            tokenizer = llguidance.LLTokenizer(
                text, n_vocab=max(self.vocab_size, size), eos_token=list(self.eos_token_ids)
            )
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise GrammarError(f"no llguidance tokenizer from {path}: {exc}") from exc
        logger.info("llguidance tokenizer of %d tokens built from %s", tokenizer.vocab_size, path)
        self._tokenizer = tokenizer
        return tokenizer

    @property
    def num_words(self) -> int:
        """Bitmask words per row: one bit per token of the tokenizer once built (at least the model's vocabulary)."""
        return bitmask_words(self._tokenizer.vocab_size if self._tokenizer is not None else self.vocab_size)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of grammar (in error when the grammar does not compile); GrammarError without a
        tokenizer."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            self._compiled[grammar] = compiled
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return compiled.deep_copy()

    def start(self, request_id: str, grammar: str, output_tokens: Sequence[int]) -> "RequestGrammar":
        """The matcher of a request arriving in a plan, past the output tokens it already has (a recomputed
        request replays them)."""
        try:
            matcher = self.matcher(grammar)
        except GrammarError as exc:
            return RequestGrammar(request_id, None, self.eos_token_ids, str(exc))
        state = RequestGrammar(request_id, matcher, self.eos_token_ids)
        if matcher.is_error():
            state.fail(f"the grammar does not compile: {matcher.get_error()}")
        else:
            for token in output_tokens:
                state.consume(token)
        return state


class RequestGrammar:
    """One request's matcher: the mask of its next token, and the tokens it sampled. A matcher in error (a grammar
    that does not compile here, a token the grammar refuses) lets only EOS through, so the request ends."""

    def __init__(self, request_id: str, matcher: llguidance.LLMatcher | None, eos_token_ids: tuple[int, ...],
                 error: str = "") -> None:
        self.request_id = request_id
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self.error = ""
        if error:
            self.fail(error)

    def fail(self, error: str) -> None:
        self.error = error
        logger.warning("request %s: structured output ends with EOS: %s", self.request_id, error)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row of bitmask [rows, words] int32 (host, contiguous). llguidance
        writes the row in place, as llguidance.torch.fill_next_token_bitmask does; that module is not imported: it
        loads torch's compiler (about 1.8 s) for a kernel the worker does not use."""
        if self.matcher is not None and not self.error:
            words = bitmask[row]  # [words]
            self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
            return
        bitmask[row] = token_bitmask(self.eos_token_ids, bitmask.shape[-1])

    def consume(self, token: int) -> None:
        """Advance past a sampled token; one the grammar refuses puts the request in error. A stopped matcher (its
        grammar complete) takes nothing more: a token sampled after the request ended is dropped by the scheduler."""
        if self.error or self.matcher is None or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token):
            self.fail(f"token {token} refused: {self.matcher.get_error()}")


@dataclass(frozen=True)
class GrammarMask:
    """The allowed tokens of a step's constrained logits rows."""

    rows: list[int]  # logits rows, ascending
    bitmask: torch.Tensor  # [len(rows), words] int32 on the host: bit t % 32 of word t // 32 set = token t allowed

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[len(rows), vocab] bool on device."""
        shifts = torch.arange(_BITS, dtype=torch.int32, device=device)  # [32]
        words = self.bitmask.to(device, non_blocking=True)  # [c, words]
        bits = (words[:, :, None] >> shifts) & 1  # [c, words, 32]
        return bits.flatten(1)[:, :vocab].bool()  # [c, vocab]

    def apply(self, logits: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """-inf, in the constrained rows of logits [rows, vocab], for every token the grammar does not allow, as a
        new tensor. A row where the request's own restrictions leave none of the allowed tokens (min_tokens holding
        back the EOS a complete grammar asks for) takes the grammar alone over its raw logits [rows, vocab]."""
        index = torch.tensor(self.rows, device=logits.device)  # [c]
        disallowed = ~self.allowed(logits.shape[-1], logits.device)  # [c, vocab]
        masked = logits[index].masked_fill(disallowed, float("-inf"))  # [c, vocab]
        empty = torch.isneginf(masked).all(dim=-1, keepdim=True)  # [c, 1]
        masked = torch.where(empty, raw[index].masked_fill(disallowed, float("-inf")), masked)  # [c, vocab]
        return logits.index_copy(0, index, masked)  # [rows, vocab]


def grammar_mask(grammars: Sequence[RequestGrammar | None], num_words: int) -> GrammarMask | None:
    """The mask of the rows with a grammar (None when no row has one: nothing is allocated)."""
    constrained = [(i, g) for i, g in enumerate(grammars) if g is not None]
    if not constrained:
        return None
    bitmask = torch.empty((len(constrained), num_words), dtype=torch.int32)  # [c, words]
    for j, (_, grammar) in enumerate(constrained):
        grammar.fill(bitmask, j)
    return GrammarMask([i for i, _ in constrained], bitmask)
