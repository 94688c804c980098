"""The workers' Measure calls reject bad requests naming the field, and time work by its median."""

import pytest

from apex_serve.errors import InvalidArgument
from apex_serve.measurement import check_measure, median_ns


@pytest.mark.parametrize("table,points,warmup,repeats,field", [
    ("t_nope", [(1, 0)], 0, 1, "table"),
    ("t_lin", [], 0, 1, "points"),
    ("t_lin", [(1, 0)], -1, 1, "repeats"),
    ("t_lin", [(1, 0)], 0, 0, "repeats"),
])
def test_bad_measure_requests_are_invalid_argument_naming_the_field(table, points, warmup, repeats, field) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_measure(table, ("t_lin",), points, warmup, repeats)
    assert err.value.field == field


def test_median_ns_runs_warmup_untimed_then_times_each_repeat() -> None:
    calls: list[int] = []
    synced: list[int] = []
    assert median_ns(lambda: calls.append(1), warmup=2, repeats=3, synchronize=lambda: synced.append(1)) > 0
    assert len(calls) == 5 and len(synced) == 3
