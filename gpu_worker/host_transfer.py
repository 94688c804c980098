"""Copies between the accelerator and host shared memory, behind one small interface.

On the CPU device a copy is a memcpy and the staged tensor can be used in place. On CUDA the shared-memory buffers
that DMA touches (the staging region) are registered as pinned host memory, device-to-host copies run on a side
stream ordered after the kernels that produced their sources (an event recorded on the compute stream), and the
doorbell may only ring once they have landed (the marker copied() gives). Where registration fails (the driver
refuses, e.g. no support or a locked-memory limit) the buffer stays pageable with a warning: copies still land before
their marker is done, staged by the driver, only slower.
"""

import logging
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)


class Marker(Protocol):
    """A point in the device's queued work (a CUDA event)."""

    def synchronize(self) -> None:
        """Block until the work queued before the marker is done."""


class _Done:
    """The marker of a device whose work is done when each call returns."""

    def synchronize(self) -> None:
        pass


DONE = _Done()


class HostTransfer(Protocol):
    queued: bool
    """True when device work is queued and runs after the host moves on (CUDA): whoever rings the doorbell waits for
    the staged copies' marker first, off the thread that enqueues the device's work. False when the work is done by
    the time each call returns (the CPU device): ring at once."""

    def register(self, host: torch.Tensor) -> bool:
        """Prepare a host (shared-memory) tensor for fast transfers; whether it is (pinned on CUDA)."""

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An empty host tensor of like's shape and dtype that to_host copies into fast (pinned on CUDA)."""

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Start copying src (device) into dst (host); dtypes may differ."""

    def copied(self) -> Marker:
        """A marker after every to_host so far: once it is done, they have landed in host memory."""

    def to_host_stream(self) -> Any:
        """The stream the next to_host copies run on, ordered after the device work queued so far (None on the CPU
        device): where their time is measured."""

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        """src (host) on the device, in src's dtype; may alias src on the CPU device."""

    def landed(self) -> Marker:
        """A marker after every to_device so far: once it is done, their sources may be overwritten."""

    def close(self) -> None:
        """Undo every register (before the host memory is unmapped)."""


class CpuHostTransfer:
    """The device is the CPU: host memory is device memory."""

    queued = False

    def register(self, host: torch.Tensor) -> bool:
        return True

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def copied(self) -> Marker:
        return DONE

    def to_host_stream(self) -> None:
        return None

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        return src

    def landed(self) -> Marker:
        return DONE

    def close(self) -> None:
        pass


class HostRegistry:
    """Host memory pinned through the CUDA runtime's cudaHostRegister (`cudart`: torch.cuda.cudart(), or a double),
    each registration undone by release(), in reverse order; a refused one leaves the memory pageable."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self._pinned: list[torch.Tensor] = []

    def pin(self, host: torch.Tensor) -> bool:
        nbytes = host.numel() * host.element_size()
        status = int(self._cudart.cudaHostRegister(host.data_ptr(), nbytes, 0))
        if status != 0:
            logger.warning("cudaHostRegister of %d bytes failed (cudaError %d): the copies through it stay pageable "
                           "(correct, slower)", nbytes, status)
            return False
        self._pinned.append(host)
        return True

    def release(self) -> None:
        while self._pinned:
            host = self._pinned.pop()
            status = int(self._cudart.cudaHostUnregister(host.data_ptr()))
            if status != 0:
                logger.warning("cudaHostUnregister failed (cudaError %d)", status)


class CudaHostTransfer:
    """Pinned (cudaHostRegister) shared memory, D2H copies on a side stream ordered after the producing kernels."""

    queued = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._registry = HostRegistry(torch.cuda.cudart())

    def register(self, host: torch.Tensor) -> bool:
        return self._registry.pin(host)

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)  # the caching host allocator's

    def to_host_stream(self) -> torch.cuda.Stream:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return self.stream

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.to_host_stream()):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.stream)

    def copied(self) -> Marker:
        marker = torch.cuda.Event()
        marker.record(self.stream)
        return marker

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        return src.to(self.device, non_blocking=True)

    def landed(self) -> Marker:
        marker = torch.cuda.Event()
        marker.record(torch.cuda.current_stream(self.device))
        return marker

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._registry.release()


def host_transfer_for(device: torch.device) -> HostTransfer:
    return CudaHostTransfer(device) if device.type == "cuda" else CpuHostTransfer()
