"""What the scheduler chose for one iteration and what it cost: exported per iteration (issue 6)."""

from dataclasses import dataclass

from apex_serve.overlap import Overlap
from apex_serve.types import ExecutionMode


@dataclass
class IterationRecord:
    step_id: int
    mode: ExecutionMode
    num_prefills: int
    gpu_rows: int  # accelerator-resident decode rows
    cpu_rows: int  # CPU-resident decode rows that ran
    cpu_sat_out: int  # CPU-resident requests that did not decode this iteration
    swaps_out: int
    swaps_in: int
    preemptions: int
    predicted_ns: float | None = None  # the cost model's prediction of the whole iteration, once the step returned
    measured_ns: float | None = None  # the worker's total_ns, once the step returned
    overlap: Overlap | None = None  # from the step's timings, once the step returned

    @property
    def relative_error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.predicted_ns is None or not self.measured_ns:
            return None
        return (self.predicted_ns - self.measured_ns) / self.measured_ns
