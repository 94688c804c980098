"""Shared fixtures: small random LLaMA directories written once per session, a real cpu_attention_worker."""

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apex_serve import rpc
from apex_tools.default_model import DEFAULT_SPEC, RandomLlamaSpec, write_random_llama

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA; without it they are skipped, and say so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def cpu_worker_process(address: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "cpu_attention_worker", "--address", address, "--kv-budget-bytes", str(64 * 2**20)],
    )
    asyncio.run(rpc.wait_healthy(address, 30.0))
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def cpu_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A cpu_attention_worker process for the module's tests; its address."""
    address = f"unix://{tmp_path_factory.mktemp('sock')}/cpu.sock"
    process = cpu_worker_process(address)
    yield address
    stop(process)


def prometheus_value(text: str, series: str) -> float:
    """The value of one series (`name` or `name{labels}`, as exposed) in a Prometheus text exposition; 0 if absent."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))
