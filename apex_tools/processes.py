"""Services run as local processes (`python -m <module>`) by the launcher, the benchmarks and the tests: started and
waited for until SERVING, stopped in reverse start order; and the split of this machine's cores between the device
side and the rest (DESIGN §6)."""

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from apex_serve import rpc

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


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
    """This process on cpus for the block (None: left as it is), its affinity restored after."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here: no dynamic loading in the forked child

    def setup() -> None:
        """The child gets SIGTERM if this process dies, so nothing outlives it; then it is pinned to cpus."""
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


@dataclass(frozen=True)
class Service:
    """One started service: its module, the address it serves on, its process."""

    module: str
    address: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


class ServiceGroup:
    """Service processes, each in a session of its own (a terminal's Ctrl-C reaches only this process, which stops
    them in order) and sent SIGTERM should this process die. stop_all (and leaving the `with` block) stops them in
    reverse start order: SIGTERM, then SIGKILL after stop_timeout_s."""

    def __init__(self, startup_timeout_s: float = 300.0, stop_timeout_s: float = 20.0) -> None:
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got {startup_timeout_s} and {stop_timeout_s}")
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._services: list[Service] = []

    def spawn(self, module: str, address: str, args: Sequence[str], cpus: set[int] | None = None,
              env: Mapping[str, str] | None = None) -> Service:
        """`python -m module args` (args: every flag, --address included), pinned to cpus (None: not pinned), with
        env on top of this process's variables; not waited for (see wait_serving). The kernel sends SIGTERM when the
        spawning thread ends, so spawn from a thread that outlives the service (the main thread, say)."""
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            start_new_session=True,
            preexec_fn=_child_setup(cpus),
            env={**os.environ, **env} if env else None,
        )
        service = Service(module, address, process)
        self._services.append(service)
        return service

    def wait_serving(self, service: Service, timeout_s: float | None = None) -> None:
        """Returns once the service's address answers SERVING; RuntimeError naming the module and its exit code if it
        exits first, TimeoutError after timeout_s (None: the group's startup_timeout_s)."""
        asyncio.run(self.serving(service, timeout_s))

    async def serving(self, service: Service, timeout_s: float | None = None) -> None:
        """wait_serving on a running event loop."""
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        waiter = asyncio.create_task(rpc.wait_healthy(service.address, timeout_s))
        while not waiter.done():
            if service.process.poll() is not None:
                waiter.cancel()
                raise RuntimeError(
                    f"{service.module} exited with code {service.process.returncode} during start-up")
            await asyncio.sleep(0.1)
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
        for service in reversed(list(self._services)):
            self.stop(service)

    def dead(self) -> list[tuple[str, int]]:
        """(module, exit code) of every service that exited."""
        return [(s.module, s.process.returncode) for s in self._services if s.process.poll() is not None]

    def __enter__(self) -> "ServiceGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
