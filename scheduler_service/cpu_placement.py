"""The CPU test of the scheduler's admissions and evictions (step 3 of scheduler_service.scheduler's docstring):
whether a request may live on the CPU pool, within the pool's limits, and whether it must (its peak KV does not fit
the accelerator's pool)."""

from collections.abc import Sequence
from itertools import islice

from apex_serve.types import Placement
from scheduler_service.decision import Candidates, Policy
from scheduler_service.kv_manager import KVManager
from scheduler_service.request import Request


class CpuPlacement:
    """The CPU test of one policy on one CPU pool (made anew when either changes)."""

    def __init__(self, policy: Policy, kv: KVManager, max_rows: int, max_sit_out: int) -> None:
        self.policy = policy
        self.max_rows = max_rows  # CPU decode rows one sub-batch can stage
        self.max_requests = max_rows * (max_sit_out + 1)  # CPU-resident requests at once: each runs within max_sit_out
        self._kv = kv
        # (running, CPU requests, steps the cost model observed) when a CPU row was last refused
        self._refused: tuple[int, int, int] | None = None

    def must_take(self, request: Request) -> bool:
        """Whether the request can live only on the CPU under this policy: its peak KV does not fit the accelerator's
        whole pool (on the accelerator it would be preempted again and again), so no gains test applies."""
        kv = self._kv
        return self.policy.uses_cpu and kv.blocks_for(request.peak_tokens) > kv.num_total(Placement.GPU)

    def has_room(self, request: Request, num_cpu: int) -> bool:
        """Whether a hybrid policy may place the request on the CPU now: fewer than max_requests live there (num_cpu),
        and its peak KV fits beside what the CPU's requests have reserved."""
        kv = self._kv
        if not self.policy.uses_cpu or num_cpu >= self.max_requests:
            return False
        return kv.blocks_for(request.peak_tokens) <= kv.num_free(Placement.CPU) - kv.reserved(Placement.CPU)

    def takes(self, request: Request, gpu_running: list[Request], waiting: Sequence[Request], cpu_context: list[int],
              num_cpu: int, leaving: Request | None = None) -> bool:
        """Whether the request may live on the CPU: a hybrid policy, room for it at its peak beside what the CPU's
        requests have reserved, and CPU rows for it and the requests waiting behind it (an admission's; as many as one
        step stages), at their mean context over their lives, raise the predicted tokens/s of the steady decode
        iteration: the accelerator rows its pool sustains (at gpu_running's mean lifetime context; `leaving`
        excluded) with the CPU rows of cpu_context (prefix sums). num_cpu: the requests living on the CPU."""
        kv = self._kv
        if not self.has_room(request, num_cpu):
            return False
        running = len(gpu_running) + num_cpu
        if not running:  # the pools are idle: a request that fits must run somewhere
            return True
        model = self.policy.cost_model
        key = (running, len(cpu_context), 0 if model is None else model.num_observed)
        if key == self._refused:  # nothing changed since the policy last refused a CPU row: requests, or the fit
            return False
        lifetime = [r.lifetime_context for r in gpu_running if r is not leaving]
        mean = sum(lifetime) // len(lifetime) if lifetime else 0
        rows = min(len(lifetime), kv.num_total(Placement.GPU) * kv.block_size // mean) if mean else 0
        # rows of one context: what either decode kernel reads (decision.device_kv_tokens)
        steady = Candidates([], rows, rows * mean, cpu_context, 0, self.max_rows)
        start = 0 if leaving else 1
        queued = islice(waiting, start, max(start, 2 * self.max_rows - steady.num_cpu))
        contexts = [r.lifetime_context for r in (request, *queued)]
        if not self.policy.gains_from_cpu_rows(steady, contexts):
            self._refused = key
            return False
        return True
