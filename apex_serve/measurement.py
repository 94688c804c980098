"""What the workers' Measure calls share (DESIGN §5): the request checks and the median time of a piece of work."""

import statistics
import time
from collections.abc import Callable, Sequence

from apex_serve.errors import InvalidArgument

TABLE_VERSION = 4  # the tables' JSON contract (scheduler_service.cost.tables) and what each times; in a profile's key


def check_measure(table: str, known: Sequence[str], points: list[tuple[int, int]], warmup: int, repeats: int) -> None:
    if table not in known:
        raise InvalidArgument("table", f"{table!r} is not one of {tuple(known)}")
    if not points:
        raise InvalidArgument("points", f"table {table} needs at least one point")
    if warmup < 0 or repeats < 1:
        raise InvalidArgument("repeats", f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")


def median_of(sample: Callable[[], float], warmup: int, repeats: int) -> float:
    """Median of `repeats` values of sample() after `warmup` discarded ones."""
    for _ in range(warmup):
        sample()
    return float(statistics.median(sample() for _ in range(repeats)))


def median_ns(
    work: Callable[[], object], warmup: int, repeats: int, synchronize: Callable[[], None] = lambda: None
) -> float:
    """Median wall time of `repeats` calls of work after `warmup` untimed ones (synchronize ends each timed call)."""
    for _ in range(warmup):
        work()

    def timed() -> int:
        start = time.perf_counter_ns()
        work()
        synchronize()
        return time.perf_counter_ns() - start

    return median_of(timed, 0, repeats)
