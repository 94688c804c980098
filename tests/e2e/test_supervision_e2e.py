"""`apex-serve up` supervises its services: a killed service is restarted (a warning names it, its exit and the
delay) while the others keep running and the gateway keeps answering; SIGTERM during a restart's backoff stops
everything and leaves no process; with --no-supervise a service's exit stops the stack with exit code 1."""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apex_serve import rpc
from apex_serve.sdk import Client
from conftest import wait_until

MODULES = ("cpu_attention_worker", "profiler_service", "gpu_worker", "scheduler_service", "gateway")


class Up:
    """An `apex-serve up` process, its stderr collected line by line as it comes."""

    def __init__(self, model_dir: Path, *flags: str) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")
        self.port = rpc.free_tcp_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apex_tools", "up", "--model-dir", str(model_dir), "--port", str(self.port),
             "--http-port", "0", "--metrics-port", "0", "--run-dir", self.run_dir, "--policy", "gpu-only", *flags],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def said(self, *texts: str) -> int:
        """How many lines so far contain every one of texts."""
        return sum(all(text in line for text in texts) for line in list(self.lines))

    def output(self) -> str:
        return "".join(self.lines)

    def services(self) -> dict[str, int]:
        """module -> pid of each live service process the launcher started."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if int(ppid) == self.process.pid and state != "Z" and b"-m" in argv:
                found[argv[argv.index(b"-m") + 1].decode()] = int(stat.parent.name)
        return found

    def wait_ready(self) -> dict[str, int]:
        wait_until(lambda: self.said("apex-serve ready") or self.process.poll() is not None, 300.0,
                   "apex-serve up to be ready")
        assert self.said("apex-serve ready"), self.output()
        services = self.services()
        assert set(services) == set(MODULES), self.output()
        return services


@contextmanager
def apex_serve_up(model_dir: Path, *flags: str) -> Iterator[Up]:
    up = Up(model_dir, *flags)
    try:
        yield up
    finally:
        up.process.kill()
        up.process.wait()
        up._reader.join(10.0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _generated_tokens(port: int) -> int:
    with Client(f"127.0.0.1:{port}") as client:
        return len(client.generate("still there?", temperature=0.0, max_tokens=4, ignore_eos=True).token_ids)


def test_a_killed_service_is_restarted_and_sigterm_during_a_backoff_stops_everything(default_model_dir: Path) -> None:
    with apex_serve_up(default_model_dir) as up:
        before = up.wait_ready()
        os.kill(before["profiler_service"], signal.SIGKILL)
        wait_until(lambda: up.said("profiler_service", "SERVING again"), 30.0, "the profiler to serve again")
        after = up.services()
        assert after["profiler_service"] != before["profiler_service"]
        assert {m: after[m] for m in MODULES if m != "profiler_service"} == {
            m: before[m] for m in MODULES if m != "profiler_service"}, "a service that did not die was restarted"
        assert up.said(f"profiler_service (pid {before['profiler_service']}) exited with code -9 (SIGKILL); "
                       "restarting it in 0.5 s") == 1, up.output()
        assert _generated_tokens(up.port) == 4, "the gateway stopped answering"

        os.kill(after["profiler_service"], signal.SIGKILL)  # up for less than 60 s: the next delay is 1 s
        wait_until(lambda: up.said("restarting it in 1.0 s"), 10.0, "the second exit to be seen")
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60.0) == 0, up.output()
        up._reader.join(10.0)
    assert up.said("profiler_service restarted") == 1, "a restart ran after the stop:\n" + up.output()
    assert not [pid for pid in {**before, **after}.values() if _alive(pid)], "a service outlived apex-serve up"
    assert not Path(up.run_dir).exists()


def test_without_supervision_a_service_exit_stops_the_stack_with_exit_code_1(default_model_dir: Path) -> None:
    with apex_serve_up(default_model_dir, "--no-supervise") as up:
        services = up.wait_ready()
        started = time.monotonic()
        os.kill(services["profiler_service"], signal.SIGKILL)
        assert up.process.wait(60.0) == 1, up.output()
        up._reader.join(10.0)
    assert time.monotonic() - started < 60.0
    assert up.said("service exited: profiler_service (code -9 (SIGKILL)); stopping the stack") == 1, up.output()
    assert not [pid for pid in services.values() if _alive(pid)], "a service outlived apex-serve up"
