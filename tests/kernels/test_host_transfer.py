"""HostTransfer, the copies between the device and host shared memory: slices of a fused QKV output (rows of a
wider tensor) land in host staging in its dtype once the copied() marker is done, after the kernels that produced
them; on CUDA through pinned memory on a side stream (the CUDA cases are marked gpu and skip without CUDA)."""

import pytest
import torch

from gpu_worker.host_transfer import CpuHostTransfer, CudaHostTransfer, HostRegistry, HostTransfer, host_transfer_for

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def fused_qkv(device: torch.device, rows: int) -> torch.Tensor:
    """A QKV output [rows, 3 * 64] in bf16 from a chain of GEMMs long enough that a copy not ordered after them would
    read unfinished memory on CUDA."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=generator).to(device)
    weight = (torch.randn(64, 64, generator=generator) / 8).to(device)
    for _ in range(200):
        x = torch.tanh(x @ weight)
    return torch.cat([x, 2 * x, 3 * x], dim=1).to(torch.bfloat16)  # [rows, 3 * 64]


@pytest.mark.parametrize("device_name", DEVICES)
def test_staged_tail_rows_of_a_fused_output_land_in_host_memory_once_copied(device_name: str) -> None:
    device = torch.device(device_name)
    transfer: HostTransfer = host_transfer_for(device)
    assert transfer.queued is (device.type == "cuda")
    host = torch.zeros(3, 8, 64, dtype=torch.float32)  # the staging region: q, k, v [max_rows, head_dim] fp32
    transfer.register(host)
    try:
        qkv = fused_qkv(device, 10)  # [10, 3 * 64]: 6 device rows, then 4 CPU rows
        q, k, v = qkv.split(64, dim=1)
        for i, part in enumerate((q, k, v)):
            transfer.to_host(host[i, :4], part[6:])  # rows of a wider tensor, bf16 -> fp32
        transfer.copied().synchronize()
        expected = qkv[6:].float().cpu().reshape(4, 3, 64).transpose(0, 1)  # [3, 4, 64]
        assert torch.equal(host[:, :4], expected), "the staged rows are not the producer's output"
        assert torch.equal(host[:, 4:], torch.zeros(3, 4, 64)), "rows past the staged ones were written"
        back = transfer.to_device(host[0, :4])
        assert back.device.type == device.type and torch.equal(back.cpu(), expected[0])
    finally:
        transfer.close()


def test_host_transfer_for_picks_the_cpu_transfer_on_the_cpu_device() -> None:
    assert isinstance(host_transfer_for(torch.device("cpu")), CpuHostTransfer)


@pytest.mark.gpu
def test_host_transfer_for_picks_the_pinned_side_stream_transfer_on_cuda() -> None:
    assert isinstance(host_transfer_for(torch.device("cuda", 0)), CudaHostTransfer)


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister as the CUDA runtime answers them: 0, or the error code of a refusal for
    the registrations numbered in `refuse` (0-based)."""

    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.refuse = refuse
        self.registered: list[int] = []  # pointers, in order
        self.unregistered: list[int] = []
        self._calls = 0

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # the runtime's name
        call, self._calls = self._calls, self._calls + 1
        if call in self.refuse:
            return 712  # cudaErrorHostMemoryAlreadyRegistered, or any refusal
        self.registered.append(ptr)
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def test_a_refused_registration_warns_and_leaves_the_memory_pageable(caplog: pytest.LogCaptureFixture) -> None:
    cudart = FakeCudart(refuse=frozenset({0}))
    registry = HostRegistry(cudart)
    with caplog.at_level("WARNING"):
        assert not registry.pin(torch.zeros(1024))
    assert "cudaHostRegister of 4096 bytes failed (cudaError 712)" in caplog.text and "pageable" in caplog.text
    registry.release()
    assert cudart.unregistered == []  # nothing of the refused one to undo


def test_release_undoes_every_accepted_registration_in_reverse_and_only_those() -> None:
    cudart = FakeCudart(refuse=frozenset({1}))
    registry = HostRegistry(cudart)
    buffers = [torch.zeros(16) for _ in range(3)]
    assert [registry.pin(b) for b in buffers] == [True, False, True]
    registry.release()
    assert cudart.unregistered == [buffers[2].data_ptr(), buffers[0].data_ptr()]
    registry.release()  # released once
    assert len(cudart.unregistered) == 2
