"""The first code of every service process ServiceGroup starts: `python -m apex_tools.service_exec PARENT_PID CPUS
MODULE ARGS...` asks the kernel for SIGTERM when the thread that started it ends (nothing outlives the launcher), pins
itself to CPUS (comma-separated core ids), then replaces itself with `python -m MODULE ARGS` (same pid).

This runs after exec, in a Python of its own, and not in the forked child before exec (subprocess's preexec_fn): a
child forked from a process whose gRPC threads are running can crash if Python code runs in it before exec."""

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def main(argv: Sequence[str]) -> None:
    parent, cpus, module, *args = argv
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the starter ended before the request took effect
        sys.exit(f"service_exec: the starting process {parent} is gone; not starting {module}")
    os.sched_setaffinity(0, {int(core) for core in cpus.split(",")})
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
