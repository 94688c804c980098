"""Per-step wall time of the forward's subtasks, summed over layers (what Step returns and the profiler reads)."""

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class StepClock:
    """Accumulates nanoseconds per subtask name. On CUDA the times are host-side (launch) times unless the caller
    synchronises; on the CPU device they are the work itself."""

    def __init__(self) -> None:
        self.ns: Counter[str] = Counter()

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.ns[name] += time.perf_counter_ns() - start
