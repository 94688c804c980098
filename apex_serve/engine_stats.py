"""What the scheduler_service reports about its engine: each iteration's record, the sampled iteration's timeline,
the cost model's prediction error, and snapshots of the scheduler and of the serving counters. Plain values, read by
the servicer (through apex_serve.convert), the Prometheus collector, the simulator and the benchmarks."""

from dataclasses import dataclass, field

from apex_serve.overlap import Overlap
from apex_serve.types import ExecutionMode, OverlapLayout, Placement, Subtask


@dataclass(frozen=True, slots=True)
class IterationRecord:
    """What the scheduler chose for one iteration and, once its step returned, what it cost."""

    step_id: int
    mode: ExecutionMode
    num_prefills: int
    gpu_rows: int  # accelerator-resident decode rows
    cpu_rows: int  # CPU-resident decode rows that ran
    cpu_sat_out: int  # CPU-resident requests that did not decode this iteration
    swaps_out: int
    swaps_in: int
    preemptions: int
    prefill_tokens: int = 0  # tokens the prefill rows (whole prompts and chunks) computed
    layout: OverlapLayout = OverlapLayout.FUSED  # meaningful where cpu_rows > 0
    predicted_ns: float | None = None  # the cost model's prediction of the whole iteration, once the step returned
    measured_ns: float | None = None  # the worker's total_ns, once the step returned
    overlap: Overlap | None = None  # from the step's timings, once the step returned

    def measured(self, predicted_ns: float | None, measured_ns: float, overlap: Overlap) -> "IterationRecord":
        """The record once its step returned (dataclasses.replace at a fifth of the cost: one per iteration)."""
        return IterationRecord(self.step_id, self.mode, self.num_prefills, self.gpu_rows, self.cpu_rows,
                               self.cpu_sat_out, self.swaps_out, self.swaps_in, self.preemptions, self.prefill_tokens,
                               self.layout, predicted_ns, measured_ns, overlap)

    @property
    def relative_error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.predicted_ns is None or not self.measured_ns:
            return None
        return (self.predicted_ns - self.measured_ns) / self.measured_ns


@dataclass(frozen=True)
class IterationTimeline:
    """The per-layer subtasks of one sampled iteration."""

    step_id: int
    mode: ExecutionMode
    start_unix_ns: int
    end_unix_ns: int
    subtasks: tuple[Subtask, ...]
    overlap: Overlap


@dataclass(frozen=True)
class ErrorStats:
    """Prediction error of the total for one mode; errors are (predicted - measured) / measured."""

    count: int
    raw_mape: float  # mean |error| of the uncorrected (table or formula) prediction, over all observations
    corrected_mape: float  # mean |error| of the predictions handed out (with the online correction)
    recent_corrected_mape: float  # the same, weighted towards the latest observations (the model's alpha)
    last_raw_error: float
    last_corrected_error: float


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's queues, KV pools and iteration counts at one moment."""

    policy: str
    num_running: int  # on either pool
    num_running_cpu: int  # of them, CPU-resident
    num_waiting: int
    free_blocks: dict[Placement, int]  # per pool; 0 free of 0 for a pool the policy does not use
    total_blocks: dict[Placement, int]
    num_preemptions: int
    num_swaps: int  # in either direction
    iterations_by_mode: dict[ExecutionMode, int]  # plans that ran at least one request
    recent_iterations: tuple[IterationRecord, ...]  # oldest first
    cost_model_error: dict[ExecutionMode, ErrorStats]  # empty without a cost model
    cpu_pool_degraded: bool = False  # the CPU pool is lost: every request runs on the accelerator until it is back
    cpu_pool_losses: int = 0  # times the CPU pool was lost since start
    iterations_by_layout: dict[OverlapLayout, int] = field(default_factory=dict)  # iterations with CPU rows

    @property
    def num_steps(self) -> int:
        """Plans that ran at least one request."""
        return sum(self.iterations_by_mode.values())

    @property
    def last_iteration(self) -> IterationRecord | None:
        return self.recent_iterations[-1] if self.recent_iterations else None


@dataclass(frozen=True)
class ServingStats:
    """The engine loop's counters at one moment."""

    tokens_per_s: float  # over the recent past
    num_finished: int  # requests, aborted ones included
    prompt_tokens: int
    generation_tokens: int
    latest_timeline: IterationTimeline | None  # of the latest sampled iteration
