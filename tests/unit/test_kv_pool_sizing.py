"""The device KV pool sized from the device's memory (gpu_worker.memory_profile) on a fake memory probe: the sizing
arithmetic, its refusal, and a ModelRunner whose pool the probe sizes after a real worst-case forward on the CPU."""

from pathlib import Path

import pytest
import torch

from gpu_worker.config import GpuWorkerConfig
from gpu_worker.memory_profile import kv_pool_blocks
from gpu_worker.model_runner import ModelRunner

GIB = 2**30


class FakeMemory:
    """A device of `total` bytes whose torch allocations this probe counts (weights, then what profile adds)."""

    def __init__(self, total: int, weights: int, elsewhere: int, activations: int = 0) -> None:
        self._total, self._allocated, self._elsewhere = total, weights, elsewhere
        self.activations = activations  # the peak a profile adds, unless the profile calls spend()
        self._peak = weights
        self.profiled = 0

    def spend(self, nbytes: int) -> None:
        self._peak = max(self._peak, self._allocated + nbytes)

    def total(self) -> int:
        return self._total

    def allocated(self) -> int:
        return self._allocated

    def peak(self) -> int:
        return max(self._peak, self._allocated + self.activations)

    def reset_peak(self) -> None:
        self._peak = self._allocated

    def used_elsewhere(self) -> int:
        return self._elsewhere


def test_the_pool_gets_what_weights_activations_and_other_users_leave_of_the_utilization() -> None:
    """LLaMA-3.1-8B in fp16 on a 24 GB A10 (vLLM's 0.9): 16.06 GB of weights, 1.5 GiB of activations, 0.5 GiB of CUDA
    context; 2 MiB per 16-token block (32 layers x 8 KV heads x 128 x 2 bytes x K and V x 16): 25,872 tokens."""
    memory = FakeMemory(24 * 10**9, 16_060_522_496, GIB // 2, activations=3 * GIB // 2)
    per_block = 32 * 8 * 128 * 2 * 2 * 16
    blocks = kv_pool_blocks(memory, 0.9, per_block, lambda: None)
    assert blocks == (int(24e9 * 0.9) - 16_060_522_496 - 3 * GIB // 2 - GIB // 2) // per_block == 1617


def test_a_utilization_that_leaves_no_block_is_refused_naming_it_and_the_figures() -> None:
    memory = FakeMemory(16 * 10**9, 13_476_831_232, GIB // 2, activations=GIB)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: 0\.80 x 14\.90 GiB, less 12\.55 GiB of weights, "
                                         r"1\.00 GiB of activations .* leaves no KV block of 524288 bytes"):
        kv_pool_blocks(memory, 0.8, 524_288, lambda: None)


def test_a_runner_sizes_its_pool_from_the_probe_after_a_worst_case_forward(mha_model_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    memory = FakeMemory(total=64 * 2**20, weights=0, elsewhere=0)
    calls = []
    real_forward = torch.nn.functional.linear

    def counting_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(x.shape[0])
        out = real_forward(x, weight, bias)
        memory.spend(out.numel() * out.element_size())  # the profile's activations, as the allocator would count them
        return out

    config = GpuWorkerConfig(model_dir=str(mha_model_dir), device="cpu", max_num_batched_tokens=96, max_num_seqs=5,
                             gpu_memory_utilization=0.5)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    runner = ModelRunner(config, memory=memory)
    assert 96 in calls and 5 in calls  # the layers ran at the token budget and the LM head over max_num_seqs rows
    per_block = runner.kv_cache.k[0, 0].numel() * runner.kv_cache.k.element_size() * runner.kv_cache.k.shape[0] * 2
    activations = memory.peak() - memory.allocated()
    assert activations > 0
    assert runner.info.num_kv_blocks == (int(64 * 2**20 * 0.5) - activations) // per_block
