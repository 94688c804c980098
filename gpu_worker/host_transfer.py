"""Copies between the accelerator and host shared memory, behind one small interface.

On the CPU device a copy is a memcpy and the staged tensor can be used in place. On CUDA the shared-memory
buffers are registered as pinned host memory, device-to-host copies run on a side stream ordered after the kernels
that produced their sources (an event recorded on the compute stream), and the doorbell may only ring once they
have landed (ready()).
"""

import logging
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


class HostTransfer(Protocol):
    queued: bool
    """True when device work is queued and runs after the host moves on (CUDA): the host then rings the doorbell
    after queuing the layer's window, so the staging copies run beside the window and waiting for them idles only
    the host. False when the work is done by the time each call returns (the CPU device): ring at once."""

    def register(self, host: torch.Tensor) -> None:
        """Prepare a host (shared-memory) tensor for fast transfers."""

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Start copying src (device) into dst (host); dtypes may differ."""

    def ready(self) -> None:
        """Block until every to_host so far has landed in host memory."""

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        """src (host) on the device, in src's dtype; may alias src on the CPU device."""

    def close(self) -> None:
        """Undo every register (before the host memory is unmapped)."""


class CpuHostTransfer:
    """The device is the CPU: host memory is device memory."""

    queued = False

    def register(self, host: torch.Tensor) -> None:
        pass

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def ready(self) -> None:
        pass

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        return src

    def close(self) -> None:
        pass


class CudaHostTransfer:
    """Pinned (cudaHostRegister) shared memory, D2H copies on a side stream ordered after the producing kernels."""

    queued = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._copied = torch.cuda.Event()
        self._registered: list[torch.Tensor] = []

    def register(self, host: torch.Tensor) -> None:
        status = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(), 0)
        if int(status) != 0:
            raise RuntimeError(f"cudaHostRegister of {host.numel() * host.element_size()} bytes failed: {status}")
        self._registered.append(host)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.stream)
        self._copied.record(self.stream)

    def ready(self) -> None:
        self._copied.synchronize()

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        return src.to(self.device, non_blocking=True)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for host in self._registered:
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
        self._registered.clear()


def host_transfer_for(device: torch.device) -> HostTransfer:
    return CudaHostTransfer(device) if device.type == "cuda" else CpuHostTransfer()
