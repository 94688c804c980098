"""The gpu_worker's attachment to the cpu_attention_worker's data plane (DESIGN §2, failure): a fresh data plane
attached at start-up; when the worker is lost (dead, or a layer of the CPU rows past its deadline) the plane is
closed and a background thread attaches a fresh one as soon as a worker answers at the address again."""

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import torch

from apex_serve.types import Placement, StepPlan
from cpu_attention_worker.client import CpuAttentionError, DataPlaneClient, remove_stale_segments
from cpu_attention_worker.data_plane import DataPlaneSpec
from gpu_worker.cpu_bridge import CpuAttentionBridge
from gpu_worker.host_transfer import HostTransfer, host_transfer_for
from gpu_worker.step_batch import RequestState

logger = logging.getLogger(__name__)

REATTACH_TIMEOUT_S = 2.0  # one re-attach attempt: reach the worker, tear its old plane down, set a new one up
WARNING_INTERVAL_S = 10.0  # failed re-attach attempts log at DEBUG, and one WARNING per this many seconds


def drop_lost_requests(plan: StepPlan, requests: dict[str, RequestState]) -> int:
    """The request state after plan, applied, lost the CPU pool in its forward (apex_serve.errors.CpuPoolLost): the
    requests plan admitted or swapped and every CPU-resident one dropped, the plan's new_block_ids taken back from
    the others. How many requests were dropped."""
    lost = {r.request_id for r in plan.new_requests} | {s.request_id for s in (*plan.swap_out, *plan.swap_in)}
    lost |= {rid for rid, r in requests.items() if r.placement is Placement.CPU}
    dropped = sum(requests.pop(rid, None) is not None for rid in lost)
    for cached in plan.cached_requests:
        request = requests.get(cached.request_id)
        if request is not None and cached.new_block_ids:
            del request.block_ids[-len(cached.new_block_ids):]
    return dropped


def open_bridge(address: str, spec: DataPlaneSpec, device: torch.device, timeout_s: float) -> CpuAttentionBridge:
    """A fresh data plane of spec at address (the worker's previous plane torn down), mapped here and registered
    for transfers to and from device."""
    client = DataPlaneClient.connect(address, spec, timeout_s=timeout_s, fresh=True)
    transfer: HostTransfer | None = None
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            transfer = host_transfer_for(device)
            return CpuAttentionBridge(client, transfer)
    except BaseException:
        if transfer is not None:
            transfer.close()  # its registrations go before the memory they pin is unmapped
        client.close()
        raise


class CpuPool:
    """The bridge to the current data plane (None while lost) and the thread that re-attaches one.

    `lock` is the model runner's: a step holds it while it runs, and the bridge changes only under it. on_change is
    called under the lock with each new bridge, and with None when the bridge is closed."""

    def __init__(
        self,
        address: str,
        spec: DataPlaneSpec,
        device: torch.device,
        lock: threading.Lock,
        reattach_interval_s: float,
        on_change: Callable[[CpuAttentionBridge | None], None],
    ) -> None:
        self.address = address
        self.spec = spec  # as asked: num_blocks 0 lets each data plane size its pool from the worker's budget
        self.device = device
        self.reattach_interval_s = reattach_interval_s
        self.bridge: CpuAttentionBridge | None = None
        self._lock = lock
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, timeout_s: float) -> None:
        """Attach the first data plane; CpuAttentionError when the worker does not answer within timeout_s."""
        bridge = open_bridge(self.address, self.spec, self.device, timeout_s)
        with self._lock:
            self._install(bridge)
        logger.info("attached to the cpu_attention_worker at %s: %d CPU KV blocks", self.address,
                    bridge.pool.num_blocks)

    def detach(self) -> None:
        """Close the lost data plane, remove the segments of a worker that died, and start re-attaching.
        The caller holds the lock."""
        self._close_bridge()
        remove_stale_segments()
        # a previous re-attach thread is past its install (the plane was attached), so it ends on its own
        self._thread = threading.Thread(target=self._reattach, name="cpu-pool-reattach", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop re-attaching and close the data plane."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._close_bridge()

    def _install(self, bridge: CpuAttentionBridge) -> None:
        self.bridge = bridge
        self._on_change(bridge)

    def _close_bridge(self) -> None:
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            self._on_change(None)
            bridge.close()

    def _reattach(self) -> None:
        """Every reattach_interval_s, attach a fresh data plane, until one is attached or close() is called."""
        started = warned = time.monotonic()
        attempts = 0
        while not self._stop.wait(self.reattach_interval_s):
            attempts += 1
            try:
                bridge = open_bridge(self.address, self.spec, self.device, REATTACH_TIMEOUT_S)
            except (CpuAttentionError, OSError, ValueError, RuntimeError) as exc:  # unreachable, or its plane gone
                now = time.monotonic()
                if now - warned >= WARNING_INTERVAL_S:
                    warned = now
                    logger.warning("no cpu_attention_worker at %s for %.0f s (%d attempts): %s", self.address,
                                   now - started, attempts, exc)
                else:
                    logger.debug("re-attach attempt %d at %s failed: %s", attempts, self.address, exc)
                continue
            with self._lock:
                if self._stop.is_set():
                    bridge.close()
                    return
                self._install(bridge)
            logger.info("re-attached to the cpu_attention_worker at %s after %.1f s: %d CPU KV blocks",
                        self.address, time.monotonic() - started, bridge.pool.num_blocks)
            return
