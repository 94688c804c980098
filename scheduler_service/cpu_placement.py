"""The CPU test of the scheduler's admissions and evictions (step 3 of scheduler_service.scheduler's docstring):
whether a request may live on the CPU pool, within the pool's limits, and whether it must (its peak KV does not fit
the accelerator's pool).

Two tests let a request live there. The steady test: CPU rows must raise the predicted tokens/s of the decode
iteration every running request makes. The cadence test: where prompts wait, the CPU rows that a prefill step hides
(their attention under the step's long accelerator work) decode at no cost; CPU requests are placed up to that many
when the pools' turnover brings a prefill step within every sit-out window (cadence_rows), so each of them can decode
in the prefill steps alone. Where the steady test refuses (a CPU row longer than a decode step's window: long
prompts, short outputs), this is the CPU's only gain."""

from collections.abc import Sequence
from itertools import accumulate, islice, repeat

from apex_serve.types import Placement
from scheduler_service.decision import Candidates, Policy
from scheduler_service.kv_manager import KVManager
from scheduler_service.request import Request

CADENCE_SAMPLE = 64  # waiting requests whose mean prompt, output and lifetime context the cadence test takes


class CpuPlacement:
    """The CPU test of one policy on one CPU pool (made anew when either changes)."""

    def __init__(self, policy: Policy, kv: KVManager, max_rows: int, max_sit_out: int, budget: int) -> None:
        self.policy = policy
        self.max_rows = max_rows  # CPU decode rows one sub-batch can stage
        self.max_sit_out = max_sit_out
        self.max_requests = max_rows * (max_sit_out + 1)  # CPU-resident requests at once: each runs within max_sit_out
        self.budget = budget  # tokens one iteration computes (max_num_batched_tokens)
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
        requests have reserved, and either CPU rows for it and the requests waiting behind it (an admission's; as many
        as one step stages), at their mean context over their lives, raise the predicted tokens/s of the steady decode
        iteration: the accelerator rows its pool sustains (at gpu_running's mean lifetime context; `leaving`
        excluded) with the CPU rows of cpu_context (prefix sums); or fewer than cadence_rows live there. num_cpu: the
        requests living on the CPU."""
        if not self.has_room(request, num_cpu):
            return False
        running = len(gpu_running) + num_cpu
        if not running:  # the pools are idle: a request that fits must run somewhere
            return True
        model = self.policy.cost_model
        key = (running, len(cpu_context), 0 if model is None else model.num_observed)
        if key == self._refused:  # nothing changed since the policy last refused a CPU row: requests, or the fit
            return False
        rows, mean = self._sustained_rows(gpu_running, leaving)
        steady = Candidates([], rows, mean, cpu_context, 0, self.max_rows)
        start = 0 if leaving else 1
        queued = islice(waiting, start, max(start, 2 * self.max_rows - steady.num_cpu))
        contexts = [r.lifetime_context for r in (request, *queued)]
        if self.policy.gains_from_cpu_rows(steady, contexts) or num_cpu < self.cadence_rows(rows, mean, waiting):
            return True
        self._refused = key
        return False

    def exposed(self, forced: int, gpu_rows: int, gpu_longest: int, cpu_context: list[int]) -> bool:
        """Whether a decode-only step of gpu_rows accelerator rows (longest context gpu_longest) would wait for its
        `forced` due CPU rows (the first of cpu_context, prefix sums): more than its window holds. A prompt pulled
        onto the CPU (pulls) may make the step a prefill step instead."""
        c = Candidates([], gpu_rows, gpu_longest, cpu_context, forced, self.max_rows)
        return forced > self.policy.hidden_rows(c)

    def pulls(self, request: Request, gpu_running: list[Request], waiting: Sequence[Request], num_cpu: int) -> bool:
        """Whether the request may be admitted to the CPU so that its prefill chunk hides CPU rows the iteration must
        run and a decode-only step would wait for: room for it, and a sustained cadence (cadence_rows)."""
        rows, mean = self._sustained_rows(gpu_running)
        return self.has_room(request, num_cpu) and self.cadence_rows(rows, mean, waiting) > 0

    def cadence_rows(self, rows: int, mean: int, waiting: Sequence[Request]) -> int:
        """The CPU requests a prefill cadence serves (0: none is sustained): the CPU rows that one prefill step of the
        whole budget hides beside `rows` accelerator rows of `mean` context, where over max_sit_out iterations (a
        prefill step and the decode steps after it, one short of the sit-out bound: a window that admits less than
        the mean still brings the next prefill step in time) the accelerator's rows and the hidden ones finish enough
        requests to admit a budget of prompts again. The requests' prompts, outputs and lifetime contexts (the CPU
        rows'): the means over the first CADENCE_SAMPLE waiting (none waiting: 0, no prefill step comes)."""
        sample = list(islice(waiting, CADENCE_SAMPLE))
        if not sample:
            return 0
        prompt = sum(r.num_tokens for r in sample) / len(sample)
        output = max(1.0, sum(r.peak_tokens - r.num_tokens for r in sample) / len(sample))

        def sustained(hidden: int) -> bool:
            return (rows * self.max_sit_out + hidden) / output * prompt >= self.budget

        if not sustained(self.max_rows):  # not even with a whole sub-batch hidden: no need to price the step
            return 0
        lifetime = sum(r.lifetime_context for r in sample) // len(sample)
        context = list(accumulate(repeat(lifetime, self.max_rows), initial=0))
        hidden = self.policy.hidden_rows(Candidates([self.budget], rows, mean, context, 0, self.max_rows))
        return hidden if sustained(hidden) else 0

    def _sustained_rows(self, gpu_running: list[Request], leaving: Request | None = None) -> tuple[int, int]:
        """(rows, context): the accelerator rows its pool sustains at gpu_running's mean lifetime context (`leaving`
        excluded), and that context (0 without rows)."""
        kv = self._kv
        lifetime = [r.lifetime_context for r in gpu_running if r is not leaving]
        mean = sum(lifetime) // len(lifetime) if lifetime else 0
        rows = min(len(lifetime), kv.num_total(Placement.GPU) * kv.block_size // mean) if mean else 0
        return rows, mean if rows else 0
