"""Starts the five services as local processes, waits until each is SERVING, and stops them
in order (gateway first) on Ctrl-C / SIGTERM or when one of them dies."""

import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from apex_serve import rpc
from apex_tools.processes import ServiceGroup, split_cores
from scheduler_service.config import POLICIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    model_dir: str = "models/apex-tiny-llama"
    host: str = "127.0.0.1"
    port: int = 50051  # public gRPC
    http_port: int = 8000  # OpenAI-compatible HTTP; 0: off
    api_keys: str = ""  # comma-separated; empty: no authentication
    run_dir: str = ".apex-run"  # Unix sockets of the internal services
    profile_dir: str = ".apex-profiles"  # performance profiles, one JSON file per key
    dtype: str = "float32"
    num_kv_blocks: int | None = None
    device_kv_budget_bytes: int = 64 * 2**20
    cpu_kv_budget_bytes: int = 256 * 2**20  # the cpu_attention_worker's KV pool (shared memory)
    max_num_seqs: int = 64
    policy: str = "apex"  # the scheduler's: gpu-only, neo or apex (the hybrid ones profile the workers once)
    tpot_target_ms: float = 0.0  # apex: keep each iteration's predicted time under this; 0: no target
    metrics_port: int = 9400  # the scheduler's Prometheus /metrics; 0: off
    sample_layers_every: int = 16  # every Nth iteration records per-layer timings (dashboard, traces); 0: never
    worker_threads: int = 1
    pin_cpus: bool = True  # gpu_worker on the first worker_threads cores, the others on the rest
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("port", "http_port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name}: must be in [0, 65535], got {getattr(self, name)}")
        if len(str(Path(self.run_dir).resolve())) > 80:
            raise ValueError(f"run_dir: socket paths must stay short (<= 80 chars), got {self.run_dir}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {self.policy!r}")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {self.startup_timeout_s}")

    @property
    def gateway_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}" if self.http_port else ""

    @property
    def metrics_address(self) -> str:
        return f"{self.host}:{self.metrics_port}" if self.metrics_port else ""


class Stack:
    """The five services of `apex-serve up` under one config: their flags, and the ServiceGroup that runs them."""

    def __init__(self, config: StackConfig, env: Mapping[str, str] | None = None) -> None:
        """env: variables the services get on top of this process's (OTEL_* for tracing, for example)."""
        self.config = config
        self._env = env
        self._run_dir = Path(config.run_dir).resolve()
        self._services = ServiceGroup(config.startup_timeout_s)

    def _address(self, name: str) -> str:
        return rpc.unix_address(self._run_dir, name)

    def commands(self) -> list[tuple[str, str, list[str]]]:
        """(module, address, flags) of each service, in start order."""
        c = self.config
        worker = self._address("gpu_worker")
        scheduler = self._address("scheduler")
        cpu_worker = self._address("cpu_attention_worker")
        worker_args = [
            "--model-dir", c.model_dir, "--address", worker, "--dtype", c.dtype,
            "--device-kv-budget-bytes", str(c.device_kv_budget_bytes), "--num-threads", str(c.worker_threads),
            "--cpu-worker-address", cpu_worker,
        ]
        if c.num_kv_blocks is not None:
            worker_args += ["--num-kv-blocks", str(c.num_kv_blocks)]
        return [
            ("cpu_attention_worker", cpu_worker,
             ["--address", cpu_worker, "--kv-budget-bytes", str(c.cpu_kv_budget_bytes)]),
            ("profiler_service", self._address("profiler"),
             ["--address", self._address("profiler"), "--gpu-worker-address", worker,
              "--cpu-worker-address", cpu_worker, "--profile-dir", c.profile_dir]),
            ("gpu_worker", worker, worker_args),
            ("scheduler_service", scheduler,
             ["--address", scheduler, "--worker-address", worker, "--max-num-seqs", str(c.max_num_seqs),
              "--policy", c.policy, "--profiler-address", self._address("profiler"),
              "--tpot-target-ms", str(c.tpot_target_ms), "--sample-layers-every", str(c.sample_layers_every),
              "--metrics-address", c.metrics_address]),
            ("gateway", c.gateway_address,
             ["--model-dir", c.model_dir, "--address", c.gateway_address, "--http-address", c.http_address,
              "--scheduler-address", scheduler, "--api-keys", c.api_keys]),
        ]

    def _cpus(self, module: str) -> set[int] | None:
        """DESIGN §6: the gpu_worker gets cores of its own; None (no pinning) when too few exist."""
        if not self.config.pin_cpus:
            return None
        device, rest = split_cores(device=self.config.worker_threads)
        return device if module == "gpu_worker" else rest

    def start(self) -> None:
        """Every service started at once, then waited for in start order."""
        shutil.rmtree(self._run_dir, ignore_errors=True)  # stale sockets of a killed run
        self._run_dir.mkdir(mode=0o700, parents=True)
        try:
            started = [self._services.spawn(module, address, args, self._cpus(module), self._env)
                       for module, address, args in self.commands()]
            for service in started:
                self._services.wait_serving(service)
                logger.info("%-21s SERVING on %s (pid %d)", service.module, service.address, service.pid)
        except BaseException:
            self.stop()
            raise

    def dead(self) -> list[tuple[str, int]]:
        return self._services.dead()

    def stop(self) -> None:
        """Every service stopped in reverse start order (the gateway drains first), the run directory removed."""
        self._services.stop_all()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_until_signal(config: StackConfig) -> int:
    """The `apex-serve up` main loop. Returns the exit code."""
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = Stack(config)
    stack.start()
    http = (f", OpenAI HTTP on http://{config.http_address}/v1, dashboard http://{config.http_address}/dashboard"
            if config.http_address else "")
    if config.metrics_address:
        http += f", metrics http://{config.metrics_address}/metrics"
    logger.info("apex-serve ready: gateway gRPC on %s%s, model %s (pid %d; Ctrl-C stops)",
                config.gateway_address, http, Path(config.model_dir).name, os.getpid())
    code = 0
    while not stopping:
        if dead := stack.dead():
            logger.error("service exited: %s; stopping the stack", ", ".join(f"{m} ({c})" for m, c in dead))
            code = 1
            break
        time.sleep(0.2)
    logger.info("stopping the stack")
    stack.stop()
    logger.info("stopped")
    return code
