"""How much of an iteration's CPU attention the accelerator side's work hid, each side's idle time, and why the
accelerator was idle (DESIGN §8). Two ways to the hidden time: from a step's summed timings (every iteration) and
from the per-layer subtask intervals of a sampled iteration (exact)."""

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from apex_serve.types import StepTimings, Subtask, SubtaskKind

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


class GapCause(enum.Enum):
    """Why the accelerator's compute lane (device_linear, device_attention) was idle."""

    WAITING_FOR_CPU = "waiting for the CPU"  # blocked until a CPU attention result came back
    STAGING = "staging"  # copying the CPU rows' q/k/v out or o back
    HOST_WORK = "host work between subtasks"  # launches and bookkeeping inside the forward
    STEP_OVERHEAD = "scheduling / step overhead"  # before the first subtask or after the last: plan, embed, sample


@dataclass(frozen=True)
class Gap:
    start_ns: int
    end_ns: int
    cause: GapCause


def _complement(window: Interval, busy: Sequence[Interval]) -> list[Interval]:
    """The parts of window that disjoint, sorted `busy` leaves free."""
    free, cursor = [], window[0]
    for start, end in busy:
        if start > cursor:
            free.append((cursor, min(start, window[1])))
        cursor = max(cursor, end)
        if cursor >= window[1]:
            break
    if cursor < window[1]:
        free.append((cursor, window[1]))
    return [(s, e) for s, e in free if e > s]


def _interior_cause(gap: Interval, cpu: Sequence[Interval]) -> GapCause:
    """The accelerator blocks on the CPU only to collect a result, so a gap waited for the CPU exactly when a CPU
    attention ended inside it; CPU work that merely runs during a gap and ends after it was not being waited for."""
    return GapCause.WAITING_FOR_CPU if any(gap[0] < end <= gap[1] for _, end in cpu) else GapCause.HOST_WORK


def accelerator_gaps(window: Interval, compute: Iterable[Interval], staging: Iterable[Interval],
                     cpu: Iterable[Interval]) -> list[Gap]:
    """The idle stretches of the accelerator's compute within window (the step's [start, end)), each with its cause:
    before the first and after the last subtask of any kind, step overhead; under a staging interval, staging; else
    waiting for the CPU when a CPU attention ended in it, host work otherwise. Adjacent stretches of one cause merge."""
    busy, copies, cpu_work = union(compute), union(staging), union(cpu)
    everything = union([*busy, *copies, *cpu_work])
    if not everything:
        return [Gap(window[0], window[1], GapCause.STEP_OVERHEAD)] if window[1] > window[0] else []
    first, last = everything[0][0], everything[-1][1]
    pieces: list[Gap] = []
    for start, end in _complement(window, busy):
        if start < first:
            pieces.append(Gap(start, min(end, first), GapCause.STEP_OVERHEAD))
        inner = (max(start, first), min(end, last))
        if inner[1] > inner[0]:
            for s, e in _complement(inner, copies):
                pieces.append(Gap(s, e, _interior_cause((s, e), cpu_work)))
            pieces += [Gap(max(s, inner[0]), min(e, inner[1]), GapCause.STAGING)
                       for s, e in copies if s < inner[1] and e > inner[0]]
        if end > last:
            pieces.append(Gap(max(start, last), end, GapCause.STEP_OVERHEAD))
    merged: list[Gap] = []
    for gap in sorted(pieces, key=lambda g: g.start_ns):
        if merged and merged[-1].cause is gap.cause and merged[-1].end_ns >= gap.start_ns:
            merged[-1] = Gap(merged[-1].start_ns, max(merged[-1].end_ns, gap.end_ns), gap.cause)
        else:
            merged.append(gap)
    return merged


def subtask_gaps(window: Interval, subtasks: Iterable[Subtask]) -> list[Gap]:
    """accelerator_gaps of a step's recorded subtasks."""
    lanes: dict[SubtaskKind, list[Interval]] = {kind: [] for kind in SubtaskKind}
    for s in subtasks:
        lanes[s.kind].append((s.start_unix_ns, s.end_unix_ns))
    compute = lanes[SubtaskKind.DEVICE_LINEAR] + lanes[SubtaskKind.DEVICE_ATTENTION]
    return accelerator_gaps(window, compute, lanes[SubtaskKind.STAGING], lanes[SubtaskKind.CPU_ATTENTION])


def gap_totals(gaps: Iterable[Gap]) -> dict[GapCause, int]:
    """Nanoseconds of idle accelerator per cause, every cause present (0 when absent)."""
    totals = dict.fromkeys(GapCause, 0)
    for gap in gaps:
        totals[gap.cause] += gap.end_ns - gap.start_ns
    return totals
