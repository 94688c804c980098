"""How much of an iteration's CPU attention the accelerator side's work hid, and each side's idle time
(DESIGN §8). Two ways to the same quantity: from a step's summed timings (every iteration) and from
the per-layer subtask intervals of a sampled iteration (exact)."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from apex_serve.types import StepTimings, Subtask

Interval = tuple[int, int]  # [start, end) in nanoseconds


@dataclass(frozen=True)
class Overlap:
    cpu_attention_ns: int  # the CPU side's attention time
    hidden_ns: int  # of it, the time the accelerator side was busy too
    device_idle_ns: int  # the accelerator side waiting within the iteration's forward
    cpu_idle_ns: int  # the CPU side idle within the iteration's forward

    @property
    def hidden_ratio(self) -> float:
        """hidden / CPU attention; 0 when no CPU attention ran."""
        return self.hidden_ns / self.cpu_attention_ns if self.cpu_attention_ns else 0.0


def from_timings(t: StepTimings) -> Overlap:
    """The accelerator side blocks (wait_ns) only while CPU attention it needs is still running, so the
    exposed CPU time is the wait (at most the CPU time) and the rest was hidden."""
    exposed = min(t.wait_ns, t.cpu_attention_ns)
    return Overlap(
        cpu_attention_ns=t.cpu_attention_ns,
        hidden_ns=t.cpu_attention_ns - exposed,
        device_idle_ns=t.wait_ns,
        cpu_idle_ns=max(t.forward_ns - t.cpu_attention_ns, 0),
    )


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Disjoint, sorted intervals covering the same time."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def length(intervals: Sequence[Interval]) -> int:
    """Total time of disjoint intervals."""
    return sum(end - start for start, end in intervals)


def intersection_length(a: Sequence[Interval], b: Sequence[Interval]) -> int:
    """Time covered by both of two disjoint, sorted interval lists."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            total += end - start
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def from_intervals(device: Iterable[Interval], cpu: Iterable[Interval]) -> Overlap:
    """Exact overlap of the accelerator side's busy intervals with the CPU side's, over the window from the
    first subtask's start to the last one's end."""
    d, c = union(device), union(cpu)
    if not d and not c:
        return Overlap(0, 0, 0, 0)
    window = max(x[-1][1] for x in (d, c) if x) - min(x[0][0] for x in (d, c) if x)
    return Overlap(
        cpu_attention_ns=length(c),
        hidden_ns=intersection_length(d, c),
        device_idle_ns=window - length(d),
        cpu_idle_ns=window - length(c),
    )


def from_subtasks(subtasks: Iterable[Subtask]) -> Overlap:
    device: list[Interval] = []
    cpu: list[Interval] = []
    for s in subtasks:
        (cpu if s.kind.on_cpu else device).append((s.start_unix_ns, s.end_unix_ns))
    return from_intervals(device, cpu)
