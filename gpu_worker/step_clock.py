"""Per-step time of the forward's subtasks, summed over layers (what Step returns and the profiler reads), and on
sampled steps each layer's subtask intervals (the timeline a trace and the dashboard show).

A subtask's time is the device's: on the CPU device the host's monotonic clock is it; on CUDA a sampled step
synchronises at the end of each interval (so its host intervals are the device's work, at the cost of emptying the
queue), and every other step records a pair of timing events per interval on the stream the work runs on, read by
resolve() once the step's own synchronisation has passed them."""

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from apex_serve.types import Subtask, SubtaskKind

_KINDS = {kind.value: kind for kind in SubtaskKind}


class TimingEvent(Protocol):
    """A point on a device stream whose time can be read once the device has passed it (torch.cuda.Event with
    enable_timing)."""

    def record(self, stream: Any = None) -> None:
        """Mark the point after the work queued on `stream` (None: the current stream) so far."""

    def elapsed_time(self, end: "TimingEvent") -> float:
        """Milliseconds of device time from this event to `end`, both passed."""


class StepClock:
    """Accumulates nanoseconds per subtask name. Without `events`, on the monotonic clock (the one the
    cpu_attention_worker stamps its ring entries with), calling `synchronize` (if given) at the end of each recorded
    interval; with `events` (a factory of TimingEvents), as device time between two events per interval, added by
    resolve()."""

    def __init__(
        self,
        record: bool = False,
        synchronize: Callable[[], None] | None = None,
        events: Callable[[], TimingEvent] | None = None,
    ) -> None:
        if record and events is not None:
            raise ValueError("a recording clock stamps intervals on the host clock; it takes synchronize, not events")
        self.ns: Counter[str] = Counter()
        self.record = record
        self._synchronize = synchronize if record else None
        self._events = events
        self._pending: list[tuple[str, TimingEvent, TimingEvent]] = []  # (name, start, end) not yet resolved
        self.intervals: list[Subtask] = []  # monotonic ns, when recording

    @contextmanager
    def measure(self, name: str, layer: int = 0, sub_batch: int = 0, stream: Any = None) -> Iterator[None]:
        """Time the block's work as `name`; with events, on `stream` (None: the current stream), where the block
        queues it."""
        if self._events is not None:
            start = self._events()
            start.record(stream)
            try:
                yield
            finally:
                end = self._events()
                end.record(stream)
                self._pending.append((name, start, end))
            return
        start_ns = time.monotonic_ns()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            end_ns = time.monotonic_ns()
            self.ns[name] += end_ns - start_ns
            if self.record and name in _KINDS:
                self.intervals.append(Subtask(_KINDS[name], layer, sub_batch, start_ns, end_ns))

    def resolve(self) -> None:
        """Add the device time of every event-timed interval so far to ns; call after a synchronisation that follows
        all of them (reading an event the device has not passed raises)."""
        pending, self._pending = self._pending, []
        for name, start, end in pending:
            self.ns[name] += round(start.elapsed_time(end) * 1e6)

    def add_interval(self, kind: SubtaskKind, layer: int, sub_batch: int, start_ns: int, end_ns: int) -> None:
        """An interval measured elsewhere on the same clock (the CPU side's attention)."""
        if self.record:
            self.intervals.append(Subtask(kind, layer, sub_batch, start_ns, end_ns))

    def subtasks_unix(self) -> tuple[Subtask, ...]:
        """The recorded intervals on the wall clock, in start order."""
        offset = time.time_ns() - time.monotonic_ns()
        return tuple(
            Subtask(s.kind, s.layer, s.sub_batch, s.start_unix_ns + offset, s.end_unix_ns + offset)
            for s in sorted(self.intervals, key=lambda s: s.start_unix_ns)
        )
