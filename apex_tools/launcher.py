"""Starts the five services as local processes, waits until each is SERVING, restarts any that exits (or, without
supervision, stops the stack when one exits), and stops them in order (gateway first) on Ctrl-C / SIGTERM."""

import logging
import os
import shutil
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from apex_serve import rpc
from apex_serve.flags import option
from apex_tools.processes import ServiceGroup, StopRequested, split_cores
from apex_tools.supervisor import describe_exit, supervise
from gateway.config import API_KEYS_ENV
from scheduler_service.config import POLICIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackConfig:
    model_dir: str = option(
        "models/apex-tiny-llama",
        help="model directory (Hugging Face layout); the default one is written with random weights when missing",
    )
    host: str = option("127.0.0.1", help="interface of the public gRPC, HTTP and metrics ports")
    port: int = option(50051, help="public gRPC port of the gateway")
    http_port: int = option(8000, help="OpenAI-compatible HTTP port; 0: off")
    api_keys_file: str = option(
        "",
        help=f"file of accepted API keys, one a line or comma-separated, readable by its owner only (the gateway's "
        f"--api-keys-file); keys in the environment variable {API_KEYS_ENV} are accepted as well; neither: no "
        f"authentication",
    )
    run_dir: str = option(
        ".apex-run", help="directory of the internal services' Unix sockets (its path at most 80 characters)"
    )
    profile_dir: str = option(".apex-profiles", help="directory of performance profiles, one JSON file per key")
    dtype: str = option("auto", help="model dtype: auto (float16 on CUDA, float32 on the CPU), float32, bfloat16 or "
                        "float16")
    num_kv_blocks: int | None = option(
        None, help="blocks of the gpu_worker's KV pool; unset: on CUDA what 0.9 of the GPU's memory leaves after the "
        "weights and a worst-case forward, on the CPU from --device-kv-budget-bytes"
    )
    device_kv_budget_bytes: int = option(
        64 * 2**20, help="the CPU device: bytes of memory for the gpu_worker's KV pool (K and V of all layers)"
    )
    cpu_kv_budget_bytes: int = option(256 * 2**20, help="bytes of shared memory for the cpu_attention_worker's KV pool")
    max_num_seqs: int = option(64, help="requests the scheduler runs at once")
    max_num_batched_tokens: int | None = option(
        None, help="tokens one iteration computes (a decode row one, a prefill chunk its tokens): longer prompts are "
        "prefilled in chunks over several iterations; unset: the scheduler's default (8192)"
    )
    policy: str = option(
        "apex", help="the scheduler's policy: gpu-only, neo or apex (the hybrid ones profile the workers once)"
    )
    tpot_slo_ms: float = option(
        0.0, help="apex and neo: keep the running requests' predicted p99 TPOT under this, in ms; 0: no objective"
    )
    max_sit_out: int = option(
        4, help="apex and neo: iterations a CPU-resident request may go without decoding before it must run"
    )
    ttft_slo_ms: float = option(
        0.0, help="apex and neo: keep waiting requests' predicted time to first token under this, in ms; 0: none"
    )
    async_scheduling: bool = option(
        True, help="the scheduler plans each iteration while the gpu_worker runs the one before (off: one at a time)"
    )
    metrics_port: int = option(9400, help="port of the scheduler's Prometheus /metrics; 0: off")
    sample_layers_every: int = option(
        16, help="every Nth iteration records per-layer timings (dashboard, traces); 0: never"
    )
    worker_threads: int = option(
        1, help="torch threads of the gpu_worker when its device is the CPU (and the cores it is pinned to)"
    )
    pin_cpus: bool = option(
        True, help="pin the gpu_worker to the first --worker-threads cores and the other services to the rest"
    )
    startup_timeout_s: float = option(300.0, help="seconds each service may take to report SERVING")
    drain_timeout_s: float = option(
        10.0, help="seconds the gateway's requests in flight get to finish on stop; those still running are then cut "
        "(an error event then [DONE] on HTTP, UNAVAILABLE on gRPC)"
    )
    stall_timeout_s: float = option(
        30.0, help="seconds the scheduler's engine may run no step while it has requests running before the gateway "
        "reports it not ready (/health 503) until it steps again (the gateway's --stall-timeout-s); 0: not watched"
    )
    supervise: bool = option(
        True, help="restart a service that exits, with backoff (0.5 s doubling up to 30 s, 0.5 s again once it "
        "stayed up 60 s); off: a service's exit stops the stack"
    )

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
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s: must be >= 0, got {self.drain_timeout_s}")
        if self.stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s: must be >= 0 (0: not watched), got {self.stall_timeout_s}")
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ValueError(f"api_keys_file: {self.api_keys_file} does not exist")

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
    """The five services of `apex-serve up` under one config: their flags, and the ServiceGroup that runs them (and
    restarts them, under supervise)."""

    def __init__(self, config: StackConfig, env: Mapping[str, str] | None = None) -> None:
        """env: variables the services get on top of this process's (OTEL_* for tracing, for example)."""
        self.config = config
        self._env = env
        self._run_dir = Path(config.run_dir).resolve()
        self._services = ServiceGroup(config.startup_timeout_s)

    def _address(self, name: str) -> str:
        return rpc.unix_address(self._run_dir, name)

    def commands(self) -> list[tuple[str, str, list[str]]]:
        """(module, address, flags) of each service, in start order. No secret is a flag: API keys reach the gateway
        as the path of their file, or in the APEX_API_KEYS variable it inherits from this process."""
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
        scheduler_budget = [] if c.max_num_batched_tokens is None else [
            "--max-num-batched-tokens", str(c.max_num_batched_tokens)]
        worker_args += [*scheduler_budget, "--max-num-seqs", str(c.max_num_seqs)]  # the forward that sizes its pool
        gateway_args = [
            "--model-dir", c.model_dir, "--address", c.gateway_address, "--http-address", c.http_address,
            "--scheduler-address", scheduler, "--drain-timeout-s", str(c.drain_timeout_s),
            "--stall-timeout-s", str(c.stall_timeout_s),
        ]
        if c.api_keys_file:
            gateway_args += ["--api-keys-file", c.api_keys_file]
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
              "--tpot-slo-ms", str(c.tpot_slo_ms), "--ttft-slo-ms", str(c.ttft_slo_ms),
              "--max-sit-out", str(c.max_sit_out), "--sample-layers-every", str(c.sample_layers_every),
              "--metrics-address", c.metrics_address, *scheduler_budget,
              *([] if c.async_scheduling else ["--no-async-scheduling"])]),
            ("gateway", c.gateway_address, gateway_args),
        ]

    def _cpus(self, module: str) -> set[int] | None:
        """DESIGN §6: the gpu_worker gets cores of its own; None (no pinning) when too few exist."""
        if not self.config.pin_cpus:
            return None
        device, rest = split_cores(device=self.config.worker_threads)
        return device if module == "gpu_worker" else rest

    def start(self, stop: threading.Event | None = None) -> None:
        """Every service started at once, then waited for in start order. Should one fail to start, or stop be set
        meanwhile (StopRequested), every service is stopped before the error is raised."""
        shutil.rmtree(self._run_dir, ignore_errors=True)  # stale sockets of a killed run
        self._run_dir.mkdir(mode=0o700, parents=True)
        try:
            started = [self._services.spawn(module, address, args, self._cpus(module), self._env)
                       for module, address, args in self.commands()]
            for service in started:
                self._services.wait_serving(service, stop=stop)
                logger.info("%-21s SERVING on %s (pid %d)", service.module, service.address, service.pid)
        except BaseException:
            self.stop()
            raise

    def supervise(self, stop: threading.Event) -> None:
        """Blocks until stop is set, restarting any service that exits (same module, flags, address, cores and
        environment) after a backoff of its own; the others are left alone, and a restarted one is not waited for.
        Call stop() after."""
        supervise(self._services, stop)

    def pid(self, module: str) -> int:
        """The pid of the service's current process (KeyError naming a module the stack does not run)."""
        return self._services.find(module).pid

    def dead(self) -> list[tuple[str, int]]:
        return self._services.dead()

    def stop(self) -> None:
        """Every service stopped in reverse start order (the gateway drains first), the run directory removed."""
        self._services.stop_all()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_until_signal(config: StackConfig) -> int:
    """The `apex-serve up` main loop: start, then supervise (or, with supervise off, wait until a service exits) until
    Ctrl-C / SIGTERM, then stop. Returns the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack = Stack(config)
    try:
        stack.start(stop)
    except StopRequested:
        logger.info("stopped during start-up")
        return 0
    http = (f", OpenAI HTTP on http://{config.http_address}/v1, dashboard http://{config.http_address}/dashboard"
            if config.http_address else "")
    if config.metrics_address:
        http += f", metrics http://{config.metrics_address}/metrics"
    logger.info("apex-serve ready: gateway gRPC on %s%s, model %s (pid %d; Ctrl-C stops)",
                config.gateway_address, http, Path(config.model_dir).name, os.getpid())
    code = 0
    if config.supervise:
        stack.supervise(stop)
    else:
        while not stop.wait(0.2):
            if dead := stack.dead():
                logger.error("service exited: %s; stopping the stack",
                             ", ".join(f"{m} ({describe_exit(c)})" for m, c in dead))
                code = 1
                break
    logger.info("stopping the stack")
    stack.stop()
    logger.info("stopped")
    return code
