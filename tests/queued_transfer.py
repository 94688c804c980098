"""A transfer that queues its copies as CUDA does, played on the CPU device (for the ordering tests of the data plane
and of the forward's CPU-pool writes)."""

import threading
import time

import torch

from gpu_worker.host_transfer import CpuHostTransfer


class QueuedMarker:
    """A marker of QueuedTransfer: synchronising it lands every copy queued before it, and is logged."""

    def __init__(self, transfer: "QueuedTransfer", kind: str, upto: int) -> None:
        self.transfer, self.kind, self.upto = transfer, kind, upto

    def synchronize(self) -> None:
        self.transfer.land(self)


class QueuedTransfer(CpuHostTransfer):
    """A device that queues its copies, as CUDA does, played on the CPU: a staged copy lands in host memory only when
    a marker made after it is synchronised (which may be delayed, as a busy compute stream would); every marker made,
    every synchronisation and every ring is logged with its thread, the happens-before record the test checks."""

    queued = True

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.log: list[tuple[str, object, str]] = []  # (what, marker or (slot, layer), thread name)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._landed = 0
        self._lock = threading.Lock()

    def _note(self, what: str, subject: object) -> None:
        with self._lock:
            self.log.append((what, subject, threading.current_thread().name))

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._lock:
            self._pending.append((dst, src.clone()))

    def copied(self) -> QueuedMarker:
        marker = QueuedMarker(self, "copied", len(self._pending))
        self._note("made", marker)
        return marker

    def landed(self) -> QueuedMarker:
        marker = QueuedMarker(self, "landed", len(self._pending))
        self._note("made", marker)
        return marker

    def last_made(self, kind: str) -> QueuedMarker:
        with self._lock:
            return next(m for what, m, _ in reversed(self.log) if what == "made" and m.kind == kind)

    def land(self, marker: QueuedMarker) -> None:
        time.sleep(self.delay_s)
        with self._lock, torch.inference_mode():  # the copies were queued by the forward, in inference mode
            for dst, src in self._pending[self._landed : marker.upto]:
                dst.copy_(src)
            self._landed = max(self._landed, marker.upto)
        self._note("synchronized", marker)
