"""A step's small host-made inputs (token ids, positions, block tables, slots) on the device through one copy: their
bytes packed into one host buffer (pinned on CUDA), copied at once, and viewed back in their dtypes and shapes. On
the CPU device they are used as they are."""

from collections.abc import Callable, Sequence

import torch

ALIGN = 8  # bytes: every view starts at a multiple of the widest element (int64)

Send = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
Spans = list[tuple[int, int]]  # (start, bytes) of each tensor in the packed buffer


def pack(tensors: Sequence[torch.Tensor], pinned: bool = False) -> tuple[torch.Tensor, Spans]:
    """The tensors' bytes in one uint8 host buffer, each at an ALIGN-aligned offset, and where each lies."""
    spans, total = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        spans.append((total, nbytes))
        total += -(-nbytes // ALIGN) * ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)  # [total]
    for t, (start, nbytes) in zip(tensors, spans):
        host[start : start + nbytes] = t.contiguous().view(-1).view(torch.uint8)
    return host, spans


def unpack(buffer: torch.Tensor, like: Sequence[torch.Tensor], spans: Spans) -> list[torch.Tensor]:
    """Views of a packed buffer (wherever it lies) in the dtypes and shapes of `like`."""
    return [buffer[start : start + nbytes].view(t.dtype).view(t.shape) for t, (start, nbytes) in zip(like, spans)]


def to_device_together(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The host tensors on `device`, in order, through one host-to-device copy (themselves on the CPU device)."""
    if device.type == "cpu":
        return list(tensors)
    host, spans = pack(tensors, pinned=device.type == "cuda")
    return unpack(host.to(device, non_blocking=True), tensors, spans)
