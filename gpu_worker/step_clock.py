"""Per-step wall time of the forward's subtasks, summed over layers (what Step returns and the profiler reads), and on
sampled steps each layer's subtask intervals (the timeline a trace and the dashboard show)."""

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from apex_serve.types import Subtask, SubtaskKind

_KINDS = {kind.value: kind for kind in SubtaskKind}


class StepClock:
    """Accumulates nanoseconds per subtask name on the monotonic clock (the one the cpu_attention_worker stamps its
    ring entries with). On CUDA the times are host-side (launch) times unless `synchronize` is given: a recording
    clock calls it at the end of each interval so the intervals are the device's work."""

    def __init__(self, record: bool = False, synchronize: Callable[[], None] | None = None) -> None:
        self.ns: Counter[str] = Counter()
        self.record = record
        self._synchronize = synchronize if record else None
        self.intervals: list[Subtask] = []  # monotonic ns, when recording

    @contextmanager
    def measure(self, name: str, layer: int = 0, sub_batch: int = 0) -> Iterator[None]:
        start = time.monotonic_ns()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            end = time.monotonic_ns()
            self.ns[name] += end - start
            if self.record and name in _KINDS:
                self.intervals.append(Subtask(_KINDS[name], layer, sub_batch, start, end))

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
