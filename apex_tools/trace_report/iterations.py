"""Engine iterations rebuilt from the scheduler's spans: the `apex.iteration` span's attributes (the step
timings' overlap) and, on sampled iterations, its per-layer subtask children (the exact overlap)."""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from apex_serve import span_attributes as attr
from apex_serve.overlap import Gap, Interval, Overlap, accelerator_gaps, from_intervals
from apex_serve.types import SubtaskKind
from apex_tools.trace_report.spans import Span, TraceInputError

CPU_LANE, DEVICE_LANE = attr.LANE_CPU, attr.LANE_ACCELERATOR
MODES = ("gpu_only", "async_overlap", "asym_pipeline")
SUBTASK_KINDS = tuple(attr.SUBTASK_SPANS.values())


@dataclass(frozen=True)
class SubtaskBar:
    kind: str
    lane: str  # DEVICE_LANE or CPU_LANE
    layer: int
    sub_batch: int
    start_unix_ns: int
    end_unix_ns: int


@dataclass(frozen=True)
class Iteration:
    step_id: int
    mode: str
    num_prefills: int
    gpu_rows: int
    cpu_rows: int
    cpu_sat_out: int
    sampled: bool  # the scheduler recorded per-layer children
    start_unix_ns: int
    end_unix_ns: int
    step_overlap: Overlap  # from the step's summed timings (the span's apex.overlap.* attributes)
    subtasks: tuple[SubtaskBar, ...] = ()

    @cached_property  # the summary rows, the timeline's titles and the bench read it: intersect the intervals once
    def subtask_overlap(self) -> Overlap | None:
        """Exact overlap from the subtask intervals; None when no subtask spans arrived."""
        if not self.subtasks:
            return None
        device: list[Interval] = []
        cpu: list[Interval] = []
        for bar in self.subtasks:
            (cpu if bar.lane == CPU_LANE else device).append((bar.start_unix_ns, bar.end_unix_ns))
        return from_intervals(device, cpu)

    @cached_property
    def gaps(self) -> list[Gap]:
        """The accelerator's idle stretches within the iteration span, with their causes; [] when not sampled."""
        if not self.subtasks:
            return []
        lanes: dict[str, list[Interval]] = defaultdict(list)
        for bar in self.subtasks:
            lanes[bar.kind].append((bar.start_unix_ns, bar.end_unix_ns))
        kind = attr.SUBTASK_SPANS
        compute = lanes[kind[SubtaskKind.DEVICE_LINEAR]] + lanes[kind[SubtaskKind.DEVICE_ATTENTION]]
        return accelerator_gaps((self.start_unix_ns, self.end_unix_ns), compute, lanes[kind[SubtaskKind.STAGING]],
                                lanes[kind[SubtaskKind.CPU_ATTENTION]])

    @property
    def hybrid(self) -> bool:
        """CPU attention ran in it (it has CPU-lane subtasks)."""
        return any(bar.lane == CPU_LANE for bar in self.subtasks)


def _int(span: Span, key: str) -> int:
    value = span.attributes.get(key, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TraceInputError(f"span {span.name} {span.span_id}: {key}={value!r} is not an integer") from None


def _subtask(span: Span) -> SubtaskBar:
    kind = str(span.attributes.get(attr.SUBTASK_KIND, span.name))
    default_lane = CPU_LANE if kind == attr.SUBTASK_SPANS[SubtaskKind.CPU_ATTENTION] else DEVICE_LANE
    return SubtaskBar(
        kind=kind, lane=str(span.attributes.get(attr.SUBTASK_LANE, default_lane)),
        layer=_int(span, attr.SUBTASK_LAYER), sub_batch=_int(span, attr.SUBTASK_SUB_BATCH),
        start_unix_ns=span.start_unix_ns, end_unix_ns=span.end_unix_ns,
    )


def _iteration(span: Span, children: list[Span]) -> Iteration:
    bars = sorted((_subtask(c) for c in children if c.name in SUBTASK_KINDS or attr.SUBTASK_KIND in c.attributes),
                  key=lambda b: (b.start_unix_ns, b.lane, b.layer))
    return Iteration(
        step_id=_int(span, attr.ITERATION_STEP_ID),
        mode=str(span.attributes.get(attr.ITERATION_MODE, "unknown")),
        num_prefills=_int(span, attr.ITERATION_NUM_PREFILLS),
        gpu_rows=_int(span, attr.ITERATION_GPU_ROWS),
        cpu_rows=_int(span, attr.ITERATION_CPU_ROWS),
        cpu_sat_out=_int(span, attr.ITERATION_CPU_SAT_OUT),
        sampled=bool(span.attributes.get(attr.ITERATION_SAMPLED, False)) or bool(bars),
        start_unix_ns=span.start_unix_ns,
        end_unix_ns=span.end_unix_ns,
        step_overlap=Overlap(
            cpu_attention_ns=_int(span, attr.OVERLAP_CPU_ATTENTION_NS),
            hidden_ns=_int(span, attr.OVERLAP_HIDDEN_NS),
            device_idle_ns=_int(span, attr.OVERLAP_DEVICE_IDLE_NS),
            cpu_idle_ns=_int(span, attr.OVERLAP_CPU_IDLE_NS),
        ),
        subtasks=tuple(bars),
    )


def build_iterations(spans: Iterable[Span]) -> list[Iteration]:
    """Iterations in time order. Spans are deduplicated by id: a Jaeger search returns a span once per trace
    that holds it, and a file may be written twice."""
    unique = {(s.trace_id, s.span_id): s for s in spans}
    children: dict[tuple[str, str], list[Span]] = defaultdict(list)
    for s in unique.values():
        if s.parent_span_id:
            children[(s.trace_id, s.parent_span_id)].append(s)
    iterations = [_iteration(s, children[key]) for key, s in unique.items() if s.name == attr.ITERATION_SPAN]
    if not iterations:
        raise TraceInputError(f"no {attr.ITERATION_SPAN!r} spans among the {len(unique)} spans read "
                              "(is the scheduler's tracing on, and is this its service?)")
    return sorted(iterations, key=lambda it: (it.start_unix_ns, it.step_id))
