"""Services run as local processes (`python -m <module>`) by the launcher, the benchmarks and the tests: started and
waited for until SERVING, replaced by a fresh process of the same command, stopped in reverse start order; and the
split of this machine's cores between the device side and the rest (DESIGN §6)."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self

from apex_serve import rpc

logger = logging.getLogger(__name__)


def split_cores(device: int = 1, host: int | None = None) -> tuple[set[int] | None, set[int] | None]:
    """(device cores, host cores) of the cores this process may use: the first `device` for the device side (the
    gpu_worker), the next `host` (None: all the others) for the rest; (None, None), no pinning, when no core would be
    left for the rest."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) <= device:
        return None, None
    rest = available[device:] if host is None else available[device : device + host]
    return set(available[:device]), set(rest)


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process, every thread of it (gRPC's pollers too), on cpus for the block (None: left as it is), its
    affinity restored after."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    _pin_threads(cpus)
    try:
        yield
    finally:
        _pin_threads(before)


def _pin_threads(cpus: set[int]) -> None:
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


class StopRequested(Exception):
    """A stop was asked for while a service was being waited for."""


@dataclass(frozen=True)
class Service:
    """One started service: its module, the address it serves on, its process, and what it was started with (a
    replacement runs the same command on the same cores with the same environment)."""

    module: str
    address: str
    process: subprocess.Popen[bytes]
    args: tuple[str, ...]
    cpus: frozenset[int]  # the cores it runs on
    env: Mapping[str, str] | None = field(default=None, compare=False)  # on top of the starting process's variables
    started_at: float = field(default_factory=time.monotonic, compare=False)  # time.monotonic() at its start

    @property
    def pid(self) -> int:
        return self.process.pid


class ServiceGroup:
    """Service processes, each in a session of its own (a terminal's Ctrl-C reaches only this process, which stops
    them in order) and sent SIGTERM should this process die. stop_all (and leaving the `with` block) stops them in
    reverse start order: SIGTERM, then SIGKILL after stop_timeout_s. A replaced service keeps its place in that
    order. The group may be used from several threads."""

    def __init__(self, startup_timeout_s: float = 300.0, stop_timeout_s: float = 20.0) -> None:
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got {startup_timeout_s} and {stop_timeout_s}")
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._services: list[Service] = []
        self._lock = threading.RLock()  # held while the list changes, and for the whole of stop_all
        # Replacements are started from this thread, which lives until stop_all: a process gets SIGTERM when the
        # thread that started it ends, and the thread that asks for a replacement may end first.
        self._spawner: ThreadPoolExecutor | None = None

    @property
    def services(self) -> list[Service]:
        """The services of the group, in start order."""
        with self._lock:
            return list(self._services)

    def spawn(self, module: str, address: str, args: Sequence[str], cpus: set[int] | None = None,
              env: Mapping[str, str] | None = None) -> Service:
        """`python -m module args` (args: every flag, --address included), pinned to cpus (None: the cores the
        calling thread may use), with env on top of this process's variables; not waited for (see wait_serving). The
        kernel sends SIGTERM when the spawning thread ends, so spawn from a thread that outlives the service (the main
        thread, say)."""
        cores = frozenset(os.sched_getaffinity(0) if cpus is None else cpus)  # unpinned: the cores it would inherit
        service = _launch(module, address, tuple(args), cores, env)
        with self._lock:
            self._services.append(service)
        return service

    def replace(self, service: Service) -> Service | None:
        """A new process of the service's command, on its cores and with its environment, in its place in the start
        order; not waited for. None (and nothing started) when the service is no longer in the group (stopped)."""
        with self._lock:
            if service not in self._services:
                return None
            if self._spawner is None:
                self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="service-spawner")
            new = self._spawner.submit(_launch, service.module, service.address, service.args, service.cpus,
                                       service.env).result()
            self._services[self._services.index(service)] = new
            return new

    def find(self, module: str) -> Service:
        """The (first started) service of module in the group; KeyError naming the module when there is none."""
        with self._lock:
            for service in self._services:
                if service.module == module:
                    return service
        raise KeyError(f"no {module} in the group")

    def wait_serving(self, service: Service, timeout_s: float | None = None,
                     stop: threading.Event | None = None) -> None:
        """Returns once the service's address answers SERVING; RuntimeError naming the module and its exit code if it
        exits first, TimeoutError after timeout_s (None: the group's startup_timeout_s), StopRequested as soon as
        stop is set."""
        asyncio.run(self.serving(service, timeout_s, stop))

    async def serving(self, service: Service, timeout_s: float | None = None,
                      stop: threading.Event | None = None) -> None:
        """wait_serving on a running event loop."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        waiter = asyncio.create_task(rpc.wait_healthy(service.address, timeout_s))
        while not waiter.done():
            if service.process.poll() is not None:
                waiter.cancel()
                raise RuntimeError(
                    f"{service.module} exited with code {service.process.returncode} during start-up")
            if stop is not None and stop.is_set():
                waiter.cancel()
                raise StopRequested(f"stop asked for while {service.module} was starting")
            await asyncio.wait({waiter}, timeout=0.1)  # back at once when it answers
        try:
            waiter.result()
        except TimeoutError as exc:
            raise TimeoutError(f"{service.module}: {exc}") from None

    def start(self, module: str, address: str, args: Sequence[str], cpus: set[int] | None = None,
              env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> Service:
        """spawn, then wait_serving; a service that fails to start is stopped before the error is raised."""
        service = self.spawn(module, address, args, cpus, env)
        try:
            self.wait_serving(service, timeout_s)
        except BaseException:
            self.stop(service)
            raise
        return service

    def stop(self, service: Service) -> None:
        """SIGTERM, then SIGKILL if it still runs after stop_timeout_s; a service that already exited is let go."""
        with self._lock:
            process = service.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("%s (pid %d) did not stop in %.0fs; killing it", service.module, process.pid,
                                   self.stop_timeout_s)
                    process.kill()
                    process.wait()
            if service in self._services:
                self._services.remove(service)

    def stop_all(self) -> None:
        """Every service stopped, in reverse start order; no replacement starts meanwhile."""
        with self._lock:
            for service in reversed(list(self._services)):
                self.stop(service)
            if self._spawner is not None:
                self._spawner.shutdown()
                self._spawner = None

    def dead(self) -> list[tuple[str, int]]:
        """(module, exit code) of every service that exited."""
        return [(s.module, s.process.returncode) for s in self.services if s.process.poll() is not None]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _launch(module: str, address: str, args: tuple[str, ...], cpus: frozenset[int],
            env: Mapping[str, str] | None) -> Service:
    """Starts the service through apex_tools.service_exec, which sets the parent-death signal and the cores before
    it becomes `python -m module args`: no Python code runs between fork and exec here."""
    cores = ",".join(str(core) for core in sorted(cpus))
    process = subprocess.Popen(
        [sys.executable, "-m", "apex_tools.service_exec", str(os.getpid()), cores, module, *args],
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    return Service(module, address, process, args, cpus, env)
