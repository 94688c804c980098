"""The step clock times the device's work: with timing events, the device time between a pair of events on the stream
the work was queued on, read after the step's synchronisation; the host's own time inside an interval is not counted."""

import time

import pytest

from gpu_worker.step_clock import StepClock


class FakeStream:
    """A device queue: work queued on it runs back to back; `passed` is how far the device has run it."""

    def __init__(self) -> None:
        self.queued_ms = 0.0
        self.passed_ms = 0.0

    def queue(self, ms: float) -> None:
        self.queued_ms += ms

    def synchronize(self) -> None:
        self.passed_ms = self.queued_ms


class FakeEvent:
    """A timing event: the device time at the point of its stream where it was recorded, readable once passed."""

    current: FakeStream

    def __init__(self) -> None:
        self.stream: FakeStream | None = None
        self.at_ms = 0.0

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream or FakeEvent.current
        self.at_ms = self.stream.queued_ms

    def elapsed_time(self, end: "FakeEvent") -> float:
        for event in (self, end):
            if event.stream is None or event.at_ms > event.stream.passed_ms:
                raise RuntimeError("the device has not passed the event yet")
        return end.at_ms - self.at_ms


@pytest.fixture
def compute() -> FakeStream:
    FakeEvent.current = FakeStream()
    return FakeEvent.current


def test_event_timed_intervals_add_the_devices_time_not_the_hosts(compute: FakeStream) -> None:
    clock = StepClock(events=FakeEvent)
    for _ in range(3):
        with clock.measure("device_linear"):
            compute.queue(2.5)
            time.sleep(0.01)  # host time (launching) inside the interval is not the device's
    with clock.measure("device_attention"):
        compute.queue(1.0)
    compute.synchronize()
    clock.resolve()
    assert clock.ns == {"device_linear": 7_500_000, "device_attention": 1_000_000}


def test_an_interval_is_timed_on_the_stream_its_copies_run_on(compute: FakeStream) -> None:
    copies = FakeStream()
    clock = StepClock(events=FakeEvent)
    with clock.measure("staging", stream=copies):
        copies.queue(0.25)
        compute.queue(4.0)  # the compute stream's work meanwhile is not staging's
    compute.synchronize()
    copies.synchronize()
    clock.resolve()
    assert clock.ns["staging"] == 250_000


def test_nothing_is_added_before_resolve_and_reading_an_unpassed_event_raises(compute: FakeStream) -> None:
    clock = StepClock(events=FakeEvent)
    with clock.measure("device_linear"):
        compute.queue(1.0)
    assert clock.ns["device_linear"] == 0
    with pytest.raises(RuntimeError, match="not passed"):
        clock.resolve()


def test_event_timed_clock_never_synchronizes_and_records_no_timeline(compute: FakeStream) -> None:
    def synchronize() -> None:
        raise AssertionError("an event-timed interval synchronised the device")

    clock = StepClock(synchronize=synchronize, events=FakeEvent)
    with clock.measure("device_linear", layer=1):
        compute.queue(1.0)
    assert clock.intervals == []
    compute.synchronize()
    clock.resolve()
    assert clock.ns["device_linear"] == 1_000_000


def test_a_recording_clock_refuses_events() -> None:
    with pytest.raises(ValueError, match="host clock"):
        StepClock(record=True, events=FakeEvent)


def test_host_clock_counts_the_hosts_time_and_synchronizes_each_recorded_interval() -> None:
    synced = []
    clock = StepClock(record=True, synchronize=lambda: synced.append(1))
    with clock.measure("device_linear", layer=0):
        time.sleep(0.01)
    assert clock.ns["device_linear"] >= 10_000_000 and synced == [1]
    assert [s.kind.value for s in clock.intervals] == ["device_linear"]
