"""What this process runs on, for the key of a performance profile (DESIGN §5)."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareFingerprint:
    accelerator: str  # device name; "cpu" without a GPU
    accelerator_memory_bytes: int
    cpu_model: str
    cpu_count: int
    cpus: tuple[int, ...]  # the cores this process is pinned to


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def fingerprint(accelerator: str = "cpu", accelerator_memory_bytes: int = 0) -> HardwareFingerprint:
    return HardwareFingerprint(
        accelerator=accelerator,
        accelerator_memory_bytes=accelerator_memory_bytes,
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        cpus=tuple(sorted(os.sched_getaffinity(0))),
    )
