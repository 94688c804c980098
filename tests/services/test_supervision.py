"""Supervision with real processes: a service that dies is started again with the same command and is back SERVING
with a new pid while the others keep theirs; a replacement keeps its place in the stop order; one that keeps exiting
waits longer each time, and the first delay again once it stayed up; a stop during a backoff or a start-up returns at
once and leaves no process."""

import asyncio
import logging
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from apex_serve import rpc
from apex_tools.launcher import Stack, StackConfig
from apex_tools.processes import Service, ServiceGroup, StopRequested
from apex_tools.supervisor import Backoff, supervise
from conftest import running_stack, wait_until

# A service for the group: `run` notes its start, then its stop on SIGTERM; `exit` notes its start and exits 1.
TOY_SERVICE = """\
import pathlib, signal, sys, time
mode, name, log = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
def note(what):
    with log.open("a") as f:
        f.write(f"{what} {name} {time.monotonic()}\\n")
def stop(signum, frame):
    note("stop")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
note("start")
if mode == "exit":
    sys.exit(1)
while True:
    signal.pause()
"""
RESTART = re.compile(r"(\S+) \(pid \d+\) exited with code (-?\d+)(?: \(\w+\))?; restarting it in ([\d.]+) s")


class Toys:
    """Toy services in one ServiceGroup, and the log of their starts and stops."""

    def __init__(self, tmp_path: Path, group: ServiceGroup) -> None:
        (tmp_path / "toy_service.py").write_text(TOY_SERVICE)
        self.log = tmp_path / "toys.log"
        self.log.touch()
        self.group = group
        self._env = {"PYTHONPATH": str(tmp_path)}

    def spawn(self, name: str, mode: str = "run") -> Service:
        service = self.group.spawn("toy_service", name, [mode, name, str(self.log)], env=self._env)
        wait_until(lambda: self.starts(name), 30.0, f"{name} to start")
        return service

    def events(self) -> list[tuple[str, str, float]]:
        return [(what, name, float(t)) for what, name, t in (line.split() for line in self.log.read_text().splitlines())]

    def starts(self, name: str) -> list[float]:
        return [t for what, n, t in self.events() if what == "start" and n == name]


@contextmanager
def supervising(run: Callable[[threading.Event], None]) -> Iterator[None]:
    """run(stop), a supervision loop, in a thread for the block; the block's end sets stop and checks that it
    returned at once."""
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(stop,), name="test supervisor")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5.0)
    assert not thread.is_alive(), "supervise did not return once stop was set"


def _children() -> set[int]:
    """The pids of this process's live child processes."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == os.getpid() and state != "Z":
            found.add(int(stat.parent.name))
    return found


def _restarts(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, float]]:
    """(module, exit code, delay) of each restart the supervisor announced."""
    found = []
    for record in caplog.records:
        if record.name == "apex_tools.supervisor" and (m := RESTART.search(record.getMessage())):
            assert record.levelno == logging.WARNING, record.getMessage()
            found.append((m.group(1), int(m.group(2)), float(m.group(3))))
    return found


def test_a_killed_service_of_the_stack_is_back_serving_with_a_new_pid_and_the_others_keep_theirs(
    default_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apex_tools.supervisor")
    modules = ("cpu_attention_worker", "profiler_service", "gpu_worker", "scheduler_service", "gateway")
    with running_stack(default_model_dir, policy="gpu-only") as stack:
        before = {m: stack.pid(m) for m in modules}
        with supervising(stack.supervise):
            os.kill(before["profiler_service"], signal.SIGKILL)
            wait_until(lambda: stack.pid("profiler_service") != before["profiler_service"], 5.0,
                       "the profiler_service to be restarted")
            asyncio.run(rpc.wait_healthy(rpc.unix_address(stack.config.run_dir, "profiler"), timeout_s=30.0))
            after = {m: stack.pid(m) for m in modules}
        assert {m: p for m, p in after.items() if p != before[m]}.keys() == {"profiler_service"}
        assert _restarts(caplog) == [("profiler_service", -9, 0.5)]
        assert stack.dead() == []
    assert not _children(), "the stack left processes behind"


def test_a_replacement_keeps_its_place_in_the_stop_order(tmp_path: Path) -> None:
    group = ServiceGroup(stop_timeout_s=5.0)
    toys = Toys(tmp_path, group)
    first, middle, last = (toys.spawn(name) for name in ("first", "middle", "last"))
    with supervising(lambda stop: supervise(group, stop)):
        middle.process.kill()
        wait_until(lambda: len(toys.starts("middle")) == 2, 10.0, "the middle service to be started again")
    replacement = group.services[1]
    assert [s.pid for s in group.services] == [first.pid, replacement.pid, last.pid]
    assert replacement.pid != middle.pid and replacement.args == middle.args and replacement.cpus == middle.cpus
    group.stop_all()
    assert [name for what, name, _ in toys.events() if what == "stop"] == ["last", "middle", "first"]
    assert not _children()


def test_a_service_that_keeps_exiting_waits_twice_as_long_each_time_up_to_the_cap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="apex_tools.supervisor")
    group = ServiceGroup(stop_timeout_s=5.0)
    toys = Toys(tmp_path, group)
    steady = toys.spawn("steady")
    toys.spawn("crashy", mode="exit")
    with supervising(lambda stop: supervise(group, stop, Backoff(initial_s=0.2, max_s=0.8, reset_after_s=60.0))):
        wait_until(lambda: len(toys.starts("crashy")) >= 5, 20.0, "four restarts of the crashing service")
    group.stop_all()
    delays = [0.2, 0.4, 0.8, 0.8]
    assert _restarts(caplog)[:4] == [("toy_service", 1, d) for d in delays]
    starts = toys.starts("crashy")
    for i, delay in enumerate(delays):
        gap = starts[i + 1] - starts[i]
        assert delay <= gap < delay + 1.5, f"restart {i + 1} came {gap:.2f} s after the exit, its delay is {delay} s"
    assert len(toys.starts("steady")) == 1 and steady.process.returncode == 0, "the steady service was touched"
    assert not _children()


def test_a_service_that_stayed_up_long_enough_restarts_after_the_first_delay_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="apex_tools.supervisor")
    group = ServiceGroup(stop_timeout_s=5.0)
    toys = Toys(tmp_path, group)
    toys.spawn("flaky")
    with supervising(lambda stop: supervise(group, stop, Backoff(initial_s=0.1, max_s=10.0, reset_after_s=1.0))):
        for quick in (True, True, False):
            service = group.find("toy_service")
            if not quick:
                wait_until(lambda s=service: time.monotonic() - s.started_at > 1.0, 5.0, "the service to stay up 1 s")
            starts = len(toys.starts("flaky"))
            service.process.kill()
            wait_until(lambda n=starts: len(toys.starts("flaky")) > n, 10.0, "the service to be started again")
    group.stop_all()
    assert [delay for _, _, delay in _restarts(caplog)] == [0.1, 0.2, 0.1]


def test_a_stop_during_a_backoff_returns_at_once_and_stopping_the_group_leaves_no_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="apex_tools.supervisor")
    group = ServiceGroup(stop_timeout_s=5.0)
    toys = Toys(tmp_path, group)
    toys.spawn("steady")
    toys.spawn("crashy", mode="exit")
    started = time.monotonic()
    with supervising(lambda stop: supervise(group, stop, Backoff(initial_s=30.0))):
        wait_until(lambda: _restarts(caplog), 10.0, "the exit to be seen")
    assert time.monotonic() - started < 10.0, "the stop waited for the backoff"
    group.stop_all()
    assert len(toys.starts("crashy")) == 1, "a restart still ran after the stop"
    assert not _children()


def test_a_stop_while_the_stack_starts_raises_stop_requested_and_leaves_no_process(default_model_dir: Path) -> None:
    config = StackConfig(model_dir=str(default_model_dir), port=rpc.free_tcp_port(), http_port=0, metrics_port=0,
                         run_dir=tempfile.mkdtemp(prefix="apex-", dir="/tmp"), policy="gpu-only")
    stack = Stack(config)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(StopRequested):
        stack.start(stop)
    assert time.monotonic() - started < 15.0, "the start-up went on after the stop"
    assert not _children(), "a service of the stopped start-up still runs"
    assert not Path(config.run_dir).exists()
