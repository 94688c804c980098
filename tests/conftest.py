"""Shared fixtures: small random LLaMA directories written once per session, a real cpu_attention_worker, a stack of
the default model for each module that only sends it requests (and its clients); the tiers' markers; waiting for a
condition with a time limit."""

import asyncio
import inspect
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from apex_serve import rpc
from apex_tools.default_model import DEFAULT_SPEC, RandomLlamaSpec, write_random_llama
from apex_tools.launcher import Stack, StackConfig
from apex_tools.processes import Service, ServiceGroup

MHA_SPEC = RandomLlamaSpec(
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    max_position_embeddings=256,
    name="test-mha-llama",
)
GQA_LLAMA3_SPEC = RandomLlamaSpec(
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    name="test-gqa-llama3",
)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / DEFAULT_SPEC.name, DEFAULT_SPEC)


@pytest.fixture(scope="session")
def mha_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / MHA_SPEC.name, MHA_SPEC, seed=1)


@pytest.fixture(scope="session")
def gqa_llama3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("models") / GQA_LLAMA3_SPEC.name, GQA_LLAMA3_SPEC, seed=2)


TIER_MARKERS = {"e2e": "slow", "bench": "bench"}  # tests/<tier>/ -> the marker every test there carries


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is `slow` and under tests/bench is `bench`, so `-m "not slow and not bench"` selects
    the fast tier. Tests marked `gpu` need CUDA; without it they are skipped, and say so."""
    import torch

    tests_dir = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(tests_dir).parts[0] if item.path.is_relative_to(tests_dir) else ""
        if tier in TIER_MARKERS:
            item.add_marker(TIER_MARKERS[tier])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.01) -> object:
    """Polls condition until it returns something true, and returns that; fails the test saying `what` was awaited
    once timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return value


async def wait_until_async(condition: Callable[[], object | Awaitable[object]], timeout_s: float, what: str,
                           interval_s: float = 0.01) -> object:
    """wait_until for the event loop: condition may be a coroutine function, and the loop runs between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def start_cpu_worker(services: ServiceGroup, address: str) -> Service:
    """A cpu_attention_worker process at address, SERVING."""
    args = ["--address", address, "--kv-budget-bytes", str(64 * 2**20)]
    return services.start("cpu_attention_worker", address, args, timeout_s=30.0)


@pytest.fixture(scope="module")
def cpu_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cpu_attention_worker process for the module's tests; its address."""
    address = f"unix://{tmp_path_factory.mktemp('sock')}/cpu.sock"
    with ServiceGroup(stop_timeout_s=30.0) as services:
        start_cpu_worker(services, address)
        yield address


def prometheus_value(text: str, series: str) -> float:
    """The value of one series (`name` or `name{labels}`, as exposed) in a Prometheus text exposition; 0 if absent."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))


@contextmanager
def running_stack(model_dir: Path, **overrides: object) -> Iterator[Stack]:
    """The five services of `apex-serve up` as processes on free TCP ports, the scheduler's metrics port off, in a
    short run directory (socket paths have a length limit); overrides: other StackConfig fields. The run directory
    must be gone after the stack stops."""
    fields: dict[str, object] = {
        "model_dir": str(model_dir), "port": rpc.free_tcp_port(), "http_port": rpc.free_tcp_port(),
        "metrics_port": 0, "run_dir": tempfile.mkdtemp(prefix="apex-", dir="/tmp"),
    }
    config = StackConfig(**(fields | overrides))  # type: ignore[arg-type]
    with Stack(config) as stack:
        yield stack
    assert not Path(config.run_dir).exists(), "the stack left its socket directory behind"


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    """`apex-serve up` of the default model with its defaults, for a module that only sends it requests (a module
    that needs other flags, or stops or kills a service, defines its own). Per module: a stack kept for the whole
    session would be a live child of the test process while the supervision tests count the processes left."""
    with running_stack(default_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    """The official `openai` client on the module's stack's HTTP API, without retries."""
    with openai.OpenAI(base_url=f"http://{stack.config.http_address}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(stack: Stack) -> str:
    """The name the module's stack serves its model under."""
    return Path(stack.config.model_dir).name
