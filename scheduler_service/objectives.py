"""The latency objectives the hybrid policies keep (--tpot-slo-ms, --ttft-slo-ms), as rules over one iteration's
options (scheduler_service.policies).

TPOT. A request's TPOT is the time between its tokens. An accelerator row's next interval is the step; a CPU request
that sits out s iterations gets about s + 1 steps between its tokens, so its interval is predicted as (iterations since
its last token, this one included) x the option's predicted step. The "predicted p99 TPOT" the policies keep under
the objective is the largest of these predicted intervals over the running requests of the iteration (an upper bound
of every percentile): an option keeps it when
    its step <= objective, and
    every CPU candidate it leaves out (sat out s iterations) would still meet it by running in the next iteration:
    (s + 2) x step <= objective; those that would not are due now, as max_sit_out makes them by count.
The candidates that run now are past correcting: their interval is what the iterations before made it. Where no
option keeps the rule, the candidates it makes due wait first (max_sit_out still bounds them); where even so none
keeps it (GPU_ONLY's own step breaks it: a long prefill chunk), no choice of CPU rows can, and GPU_ONLY runs unless
max_sit_out forces rows in (then the shortest step).
In the steady state that admissions onto the CPU pool price (every running request decoding, N CPU requests, k CPU
rows an iteration, rotating), a CPU request's interval is ceil(N / k) steps: a request is placed on the CPU pool only
while some option keeps that and the step under the objective. Admissions onto the accelerator are gpu-only's.

TTFT. A request not yet given its first token (prefilling in this iteration, or waiting) has waited w (the predicted
steps planned since it arrived) and needs n more iterations at least (its prefill chunks left, this iteration's
included; a waiting request one more); its predicted TTFT is w + n x step. An option that puts a request over the
objective is not taken where the shortest step serving the same accelerator rows and prefills (GPU_ONLY's) would keep
it under: where even that misses it, the choice of this iteration cannot help it.
"""

import math
from dataclasses import dataclass
from functools import cached_property

from scheduler_service.config import SchedulerConfig


@dataclass(frozen=True)
class LatencyObjective:
    """The stack's latency objectives in ms (0: none), as --tpot-slo-ms and --ttft-slo-ms set them."""

    tpot_ms: float = 0.0
    ttft_ms: float = 0.0

    @classmethod
    def of(cls, config: SchedulerConfig) -> "LatencyObjective":
        return cls(config.tpot_slo_ms, config.ttft_slo_ms)

    @property
    def tpot_ns(self) -> float:
        return self.tpot_ms * 1e6

    @property
    def ttft_ns(self) -> float:
        return self.ttft_ms * 1e6

    @cached_property
    def any(self) -> bool:  # cached: every option of every decision asks
        return bool(self.tpot_ms or self.ttft_ms)

    def due(self, cpu_sat_out: tuple[int, ...], step_ns: float) -> int:
        """How many CPU candidates (least recently decoded first, sat_out non-increasing) must run now at this step
        for the TPOT objective: those that would break it by sitting out once more."""
        if not self.tpot_ms or step_ns <= 0:
            return 0
        return sum(1 for s in cpu_sat_out if (s + 2) * step_ns > self.tpot_ns)

    def keeps_tpot(self, step_ns: float, cpu_rows: int, cpu_sat_out: tuple[int, ...]) -> bool:
        """Whether an option of this predicted step running the first cpu_rows candidates keeps the TPOT objective."""
        if not self.tpot_ms:
            return True
        return step_ns <= self.tpot_ns and self.due(cpu_sat_out, step_ns) <= cpu_rows

    def keeps_steady_tpot(self, step_ns: float, cpu_rows: int, num_cpu: int) -> bool:
        """Whether a steady decode iteration of this step, with cpu_rows of num_cpu CPU requests rotating, keeps the
        TPOT objective: the step, and each CPU request's interval of ceil(num_cpu / cpu_rows) steps."""
        if not self.tpot_ms:
            return True
        if num_cpu and not cpu_rows:
            return False
        return step_ns * (math.ceil(num_cpu / cpu_rows) if num_cpu else 1) <= self.tpot_ns

    def keeps_ttft(self, step_ns: float, shortest_step_ns: float, waits: tuple[tuple[float, int], ...]) -> bool:
        """Whether an option of this predicted step keeps every (waited ns, iterations left) request's predicted TTFT
        under the objective, or misses it only where the shortest step would miss it too."""
        if not self.ttft_ms:
            return True
        limit = self.ttft_ns
        return all(w + n * step_ns <= limit or w + n * shortest_step_ns > limit for w, n in waits)


NO_OBJECTIVE = LatencyObjective()
