"""The policies the simulator compares: the Scheduler's own, and NEO in the two forms the paper's comparison needs.
NEO's source is NEO-MLSys25/NEO at commit b55aaab (file:line below).

    gpu-only       the Scheduler's gpu-only policy
    apex           the Scheduler's apex policy, as the real stack runs it (max_sit_out forces CPU rows in)
    neo            NEO's algorithm on this runtime: the Scheduler's neo policy without the sit-out bound, which NEO
                   does not have (its scheduler picks CPU rows only while their attention hides under the other
                   sub-batch: swiftllm/server/scheduler.py:185-203, _decide_mode_and_gen_batch, step 3)
    neo-published  NEO as its code runs (NeoAsPublished): neo, and
                   - a launch cost per sub-batch with CPU rows, per layer, on its CPU attention: NEO runs CPU attention
                     from its launch thread and its own predictor charges lnch_T = 0.8 ms for it
                     (swiftllm/perfpredictor.py:128; swiftllm/structs.py:206-207, cpu_time = cdec_T + lnch_T); the
                     simulator's truth and the policy's model both pay it (neo_launch_ms);
                   - every prefill that overflows the accelerator pool goes to the CPU where the CPU pool has room,
                     with no test that CPU rows pay for themselves (swiftllm/server/scheduler.py:300-306);
                   - CPU requests swap back in whenever the accelerator pool stays at or under 95% of its blocks
                     (swap_in_threshold = round(num_gpu_blocks * 0.95), swiftllm/server/scheduler.py:256, 273-283),
                     as many as fit.
What neo-published still does as this runtime does: CPU rows are taken least recently decoded first (NEO walks its CPU
queue in arrival order and skips a request at least as long as one that did not fit, scheduler.py:187-203), and a
swap-in moves requests from the queue's first scheduler_service.swap_in.SWAP_IN_LOOKAHEAD.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

from apex_tools.sim.setups import Setup
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import ComposedCostModel, LayerCosts
from scheduler_service.decision import Candidates, Policy
from scheduler_service.policies import LatencyObjective, NeoPolicy

VARIANTS = ("gpu-only", "neo", "neo-published", "apex")
NEO_LAUNCH_MS = 0.8  # NEO's lnch_T (swiftllm/perfpredictor.py)
NEO_SWAP_IN_OCCUPANCY = 0.95  # NEO's swap_in_threshold (swiftllm/server/scheduler.py)
UNBOUNDED_SIT_OUT = 1 << 30  # iterations: no CPU request is ever forced in by count


@dataclass(frozen=True)
class LaunchCharged:
    """Layer costs with launch_ns added to the CPU attention of every sub-batch with CPU rows (NEO's lnch_T)."""

    inner: LayerCosts
    launch_ns: float

    def __post_init__(self) -> None:  # the inner costs' methods, bound once: the simulator calls them per step
        for name in ("t_lin", "t_pref", "t_gatt", "t_xfer", "t_sync", "t_step"):
            object.__setattr__(self, name, getattr(self.inner, name))

    def t_catt(self, rows: float, kv_tokens: float) -> float:
        return self.inner.t_catt(rows, kv_tokens) + (self.launch_ns if rows else 0.0)


class NeoAsPublished(NeoPolicy):
    """NEO's placement and swap-in rules on the neo policy (the module docstring)."""

    name = "neo-published"
    swap_in_occupancy = NEO_SWAP_IN_OCCUPANCY

    def gains_from_cpu_rows(self, steady: Candidates, contexts: Sequence[int]) -> bool:
        return True


@dataclass(frozen=True)
class Variant:
    """What one of VARIANTS runs: the setup it is priced on, the Scheduler's config, and the policy in place of the
    one the config names (None: that one)."""

    setup: Setup
    config: SchedulerConfig
    published_neo: bool = False

    def policy(self, cost_model: ComposedCostModel | None) -> Policy | None:
        if not self.published_neo or cost_model is None:
            return None
        return NeoAsPublished(cost_model, LatencyObjective.of(self.config))


def variant(name: str, setup: Setup, config: SchedulerConfig, neo_launch_ms: float = NEO_LAUNCH_MS) -> Variant:
    """The variant `name` of VARIANTS on setup, from config (whose policy it replaces)."""
    if name not in VARIANTS:
        raise ValueError(f"policy: must be one of {VARIANTS}, got {name!r}")
    if name in ("gpu-only", "apex"):
        return Variant(setup, replace(config, policy=name))
    unbounded = replace(config, policy="neo", max_sit_out=UNBOUNDED_SIT_OUT)
    if name == "neo":
        return Variant(setup, unbounded)
    charged = replace(setup, costs=LaunchCharged(setup.costs, neo_launch_ms * 1e6))
    return Variant(charged, replace(unbounded, max_swaps_per_step=config.max_num_seqs), published_neo=True)
