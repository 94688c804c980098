"""The overlap arithmetic: hidden CPU attention and idle time from summed step timings and from subtask intervals."""

from apex_serve import overlap
from apex_serve.types import StepTimings, Subtask, SubtaskKind

MS = 1_000_000


def test_union_merges_overlapping_and_touching_intervals() -> None:
    assert overlap.union([(5, 9), (0, 3), (2, 4), (9, 10), (20, 21)]) == [(0, 4), (5, 10), (20, 21)]


def test_intersection_length_counts_time_covered_by_both() -> None:
    a = [(0, 10), (20, 30)]
    b = [(5, 25), (28, 40)]
    assert overlap.intersection_length(a, b) == 5 + 5 + 2


def test_from_intervals_cpu_attention_6_of_10_ms_under_device_work_is_0_6_hidden() -> None:
    device = [(0, 4 * MS), (4 * MS, 8 * MS)]  # busy 0-8 ms
    cpu = [(2 * MS, 12 * MS)]  # 10 ms, of which 2-8 (6 ms) under the device
    o = overlap.from_intervals(device, cpu)
    assert o.cpu_attention_ns == 10 * MS and o.hidden_ns == 6 * MS
    assert abs(o.hidden_ratio - 0.6) < 1e-12
    assert o.device_idle_ns == 4 * MS  # window 0-12 ms, device busy 8
    assert o.cpu_idle_ns == 2 * MS


def test_from_timings_exposes_the_wait_and_hides_the_rest() -> None:
    t = StepTimings(forward_ns=20 * MS, wait_ns=3 * MS, cpu_attention_ns=12 * MS)
    o = overlap.from_timings(t)
    assert o.hidden_ns == 9 * MS and abs(o.hidden_ratio - 0.75) < 1e-12
    assert o.device_idle_ns == 3 * MS and o.cpu_idle_ns == 8 * MS


def test_gpu_only_iteration_has_zero_ratio_not_a_division_error() -> None:
    assert overlap.from_timings(StepTimings(forward_ns=5 * MS)).hidden_ratio == 0.0
    assert overlap.from_intervals([(0, 5)], []).hidden_ratio == 0.0
    assert overlap.from_intervals([], []).cpu_attention_ns == 0


def test_from_subtasks_puts_cpu_attention_on_the_cpu_lane_and_the_rest_on_the_accelerator() -> None:
    subtasks = [
        Subtask(SubtaskKind.DEVICE_LINEAR, 0, 0, 0, 2 * MS),
        Subtask(SubtaskKind.STAGING, 0, 0, 2 * MS, 3 * MS),
        Subtask(SubtaskKind.CPU_ATTENTION, 0, 0, 3 * MS, 7 * MS),
        Subtask(SubtaskKind.DEVICE_ATTENTION, 0, 0, 3 * MS, 5 * MS),
    ]
    o = overlap.from_subtasks(subtasks)
    assert o.cpu_attention_ns == 4 * MS and o.hidden_ns == 2 * MS
