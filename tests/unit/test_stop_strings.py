"""Stop strings over streamed text: matches across chunk boundaries, nothing past the stop."""

import pytest

from gateway.stop_strings import StopStringMatcher


def _run(chunks: list[str], stops: tuple[str, ...], include: bool = False) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stops, include)
    out = ""
    for chunk in chunks:
        result = matcher.feed(chunk)
        out += result.text
        if result.stop is not None:
            return out, result.stop
    return out + matcher.flush(), None


@pytest.mark.parametrize("split", range(1, 12))
def test_a_stop_string_split_anywhere_across_chunks_is_found(split: int) -> None:
    text = "Hello STOP world"
    assert _run([text[:split], text[split:]], ("STOP",)) == ("Hello ", "STOP")


def test_include_stop_str_in_output_keeps_the_stop_string() -> None:
    assert _run(["ab", "cEN", "Dxyz"], ("END",), include=True) == ("abcEND", "END")


def test_the_earliest_of_several_stop_strings_wins() -> None:
    assert _run(["one two three"], ("three", "two")) == ("one ", "two")


def test_without_a_match_all_text_comes_out_after_flush() -> None:
    matcher = StopStringMatcher(("STOP",), False)
    emitted = matcher.feed("xxST")
    assert emitted.text == "x", "the tail that could start a stop string must be held back"
    assert emitted.text + matcher.flush() == "xxST"


def test_no_stop_strings_pass_text_straight_through() -> None:
    assert StopStringMatcher((), False).feed("anything").text == "anything"
