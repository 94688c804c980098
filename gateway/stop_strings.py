"""Stop strings over a stream of text deltas: a stop string may span deltas."""

from dataclasses import dataclass


@dataclass(frozen=True)
class StopResult:
    text: str  # what may be emitted now
    stop: str | None = None  # the stop string that matched, if any


class StopStringMatcher:
    """Holds back the last len(longest stop) - 1 characters, which could start a stop string."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include_stop
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, delta: str) -> StopResult:
        if not self._stops:
            return StopResult(delta)
        text = self._pending + delta
        hits = [(text.find(s), s) for s in self._stops if s in text]
        if hits:
            at, stop = min(hits)
            self._pending = ""
            return StopResult(text[: at + len(stop)] if self._include else text[:at], stop)
        cut = max(len(text) - self._hold, 0)
        self._pending = text[cut:]
        return StopResult(text[:cut])

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text
