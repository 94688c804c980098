"""Supervision of a ServiceGroup (DESIGN §2: a crashed service is restarted, not a reason to stop the stack): a
service that exits is started again with the same command, on the same cores, after a delay that doubles with each
exit in a row and falls back to the first once the service stayed up long enough. The other services are left alone,
and a restarted one is not waited for: its SERVING is reported from a thread of its own."""

import logging
import signal
import threading
import time
from dataclasses import dataclass

from apex_tools.processes import Service, ServiceGroup, StopRequested

logger = logging.getLogger(__name__)

POLL_S = 0.1  # between looks at the services' processes


@dataclass(frozen=True)
class Backoff:
    """How long a service that exited waits before it is started again."""

    initial_s: float = 0.5
    max_s: float = 30.0
    reset_after_s: float = 60.0  # a service that stayed up this long waits initial_s again

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff: need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}")
        if self.reset_after_s <= 0:
            raise ValueError(f"backoff: reset_after_s must be > 0, got {self.reset_after_s}")

    def delay(self, previous_s: float | None, uptime_s: float) -> float:
        """The wait before restarting a service that exited after uptime_s seconds up; previous_s: the wait before
        its last restart (None: never restarted)."""
        if previous_s is None or uptime_s >= self.reset_after_s:
            return self.initial_s
        return min(2 * previous_s, self.max_s)


def describe_exit(returncode: int) -> str:
    """`code 1`, or `code -9 (SIGKILL)` for a process ended by a signal."""
    if returncode < 0:
        try:
            return f"code {returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return f"code {returncode}"


def supervise(group: ServiceGroup, stop: threading.Event, backoff: Backoff = Backoff()) -> None:
    """Blocks until stop is set, restarting every service of the group that exits (group.replace) after its backoff
    delay. A stop during a delay returns at once; the restarts still due are dropped, and stopping the group stops
    every process, restarted ones included."""
    delays: dict[tuple[str, str], float] = {}  # (module, address) -> the wait before its last restart
    due: dict[tuple[str, str], tuple[float, Service]] = {}  # exited services -> when they start again
    while not stop.is_set():
        now = time.monotonic()
        for service in group.services:
            key = (service.module, service.address)
            if key in due or service.process.poll() is None:
                continue
            delay = backoff.delay(delays.get(key), now - service.started_at)
            delays[key] = delay
            due[key] = (now + delay, service)
            logger.warning("%s (pid %d) exited with %s; restarting it in %.1f s", service.module, service.pid,
                           describe_exit(service.process.returncode), delay)
        for key, (at, service) in list(due.items()):
            if at > now or stop.is_set():
                continue
            del due[key]
            restarted = group.replace(service)
            if restarted is not None:
                logger.info("%s restarted (pid %d)", restarted.module, restarted.pid)
                _report_serving(group, restarted, stop)
        next_due = min((at for at, _ in due.values()), default=now + POLL_S)
        stop.wait(min(POLL_S, max(next_due - time.monotonic(), 0.0)))


def _report_serving(group: ServiceGroup, service: Service, stop: threading.Event) -> None:
    """Logs when the restarted service answers SERVING, or why it did not, without holding up the caller."""

    def wait() -> None:
        try:
            group.wait_serving(service, stop=stop)
        except (RuntimeError, StopRequested):  # exited again (the supervisor sees it) or the stack is stopping
            return
        except TimeoutError as exc:
            logger.warning("restarted %s", exc)
            return
        logger.info("%-21s SERVING again on %s (pid %d)", service.module, service.address, service.pid)

    threading.Thread(target=wait, name=f"serving {service.module}").start()
