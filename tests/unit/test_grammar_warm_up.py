"""The gpu_worker's llguidance tokenizer is built in the background once warmed up: the step of the first constrained
request does not build it, it is built once, and a model without a usable tokenizer.json leaves constrained requests
ending with EOS instead of failing the worker."""

import logging
import threading
from pathlib import Path

import llguidance
import pytest

from apex_tools.default_model import EOS_TOKEN_ID
from gpu_worker.grammar import GrammarCompiler

CHOICE = llguidance.LLMatcher.grammar_from_lark('start: "yes" | "no"')


def _join_warm_up() -> None:
    for thread in threading.enumerate():
        if thread.name == "llguidance-tokenizer":
            thread.join(timeout=30)


def test_warm_up_builds_the_tokenizer_once_off_the_calling_thread(mha_model_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    built_on: list[str] = []
    real = llguidance.LLTokenizer

    def counting(*args: object, **kwargs: object) -> llguidance.LLTokenizer:
        built_on.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLTokenizer", counting)
    compiler = GrammarCompiler(str(mha_model_dir), 258, (EOS_TOKEN_ID,))
    compiler.warm_up()
    _join_warm_up()
    assert built_on == ["llguidance-tokenizer"]
    state = compiler.start("r", CHOICE, [])
    assert not state.error
    assert built_on == ["llguidance-tokenizer"], "the first constrained request built the tokenizer again"


def test_warm_up_without_a_tokenizer_logs_and_constrained_requests_end(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    compiler = GrammarCompiler(str(tmp_path), 258, (EOS_TOKEN_ID,))
    with caplog.at_level(logging.WARNING):
        compiler.warm_up()
        _join_warm_up()
    assert "structured outputs unavailable" in caplog.text
    state = compiler.start("r", CHOICE, [])
    assert "no llguidance tokenizer" in state.error
