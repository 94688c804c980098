"""profiler_service configuration."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfilerConfig:
    address: str = "unix:///tmp/apex-serve/profiler.sock"
