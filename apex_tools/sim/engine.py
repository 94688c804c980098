"""Discrete-event simulation of one policy on one setup: the real Scheduler, a virtual clock, and a ground-truth cost
model (a second instance of the setup's, so the scheduler's online correction has nothing to learn) in place of the
workers.

Each iteration: requests whose arrival time has come join the scheduler (held back while max_queued_requests wait,
their clock still running, and offered again once a plan admits some); plan = schedule(); an empty plan with nothing
running jumps the clock to the next arrival; otherwise the step takes the truth model's uncorrected prediction of
the plan's IterationShape plus its swaps (each swapped block crosses the host link once per layer, priced by t_xfer),
every scheduled request whose scheduled tokens reach the end of its tokens (a decode row, a whole prompt, a prefill's
last chunk) samples one token (never an EOS: requests end by length), and update_from_output() takes the tokens
without timings: the scheduler's model is the truth's twin, so its online correction would learn nothing, and
skipping it (with the corrected prediction it needs) saves the fit's time on every step.
"""

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from apex_serve.engine_stats import IterationRecord
from apex_serve.errors import InvalidArgument, ResourceExhausted
from apex_serve.types import ExecutionMode, OverlapLayout, SamplingParams, StepOutput, StepPlan, StepTimings
from apex_tools.sim.setups import Setup
from apex_tools.sim.variants import NEO_LAUNCH_MS, variant
from apex_tools.sim.workloads import SimRequest
from scheduler_service.config import SchedulerConfig
from scheduler_service.scheduler import Scheduler

logger = logging.getLogger(__name__)
_NS = 1e9
_UNMEASURED = StepTimings()


@dataclass(frozen=True)
class RunResult:
    """What one simulated run measured; times in seconds of the virtual clock unless named otherwise."""

    policy: str
    hardware: str
    model: str
    workload: str
    num_requests: int
    finished: int
    rejected: int  # refused by the scheduler (longer than any KV pool it uses)
    output_tokens: int
    duration_s: float  # first arrival to last finish
    throughput_tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    iterations: int
    mode_mix: dict[str, float]  # execution mode: fraction of iterations
    layout_mix: dict[str, float]  # overlap layout: fraction of the iterations with CPU rows (empty without any)
    mean_gpu_rows: float  # accelerator decode rows per iteration
    mean_cpu_rows: float  # CPU decode rows that ran, per iteration
    mean_prefills: float  # prefill requests per iteration
    preemptions: int
    swaps: int
    swap_time_share: float  # of the virtual time spent stepping
    prefill_time_share: float  # of the virtual time spent stepping: steps that compute a prefill chunk
    wall_s: float  # of the simulation itself
    steady_throughput_tok_s: float = math.nan  # output tokens/s over the middle of the run (steady_window)
    steady_req_s: float = math.nan  # requests/s over the same window
    seed: int = 0  # of the workload's draw
    cut_fraction: float = 0.0  # of the workload's requests cut to the accelerator's KV pool


@dataclass
class _Tally:
    """Per-iteration sums, kept cheap: a few additions per step."""

    modes: Counter[ExecutionMode] = field(default_factory=Counter)
    layouts: Counter[OverlapLayout] = field(default_factory=Counter)  # of the iterations with CPU rows
    gpu_rows: int = 0
    cpu_rows: int = 0
    prefills: int = 0
    step_ns: float = 0.0
    swap_ns: float = 0.0
    prefill_ns: float = 0.0  # of the steps that compute a prefill chunk

    def add(self, record: IterationRecord, step_ns: float, swap_ns: float) -> None:
        self.modes[record.mode] += 1
        if record.cpu_rows:
            self.layouts[record.layout] += 1
        self.gpu_rows += record.gpu_rows
        self.cpu_rows += record.cpu_rows
        self.prefills += record.num_prefills
        self.step_ns += step_ns
        self.swap_ns += swap_ns
        if record.prefill_tokens:
            self.prefill_ns += step_ns


def _token_not_stopping(setup: Setup) -> int:
    eos = set(setup.worker.eos_token_ids)
    return next(t for t in range(setup.worker.vocab_size) if t not in eos)


def _swap_ns(setup: Setup, plan: StepPlan) -> float:
    blocks = sum(len(s.block_ids) for s in plan.swap_out) + sum(len(s.block_ids) for s in plan.swap_in)
    per_layer = blocks * setup.worker.block_size * setup.shape.kv_bytes_per_token
    return setup.shape.num_layers * setup.costs.t_xfer(per_layer)


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


STEADY_WINDOW = (0.3, 0.7)  # the share of completions before the steady window and where it ends


def steady_window(finish_ns: np.ndarray, outputs: np.ndarray) -> tuple[float, float]:
    """(output tokens/s, requests/s) of the steady state, as NEO measures throughput (NEO-MLSys25/NEO,
    evaluation/illustrator.py, get_tp, with the interval [0.3, 0.7] of its reproduce-fig10a.py): the requests sorted by
    completion, the gaps between consecutive completions, and of those the gaps of index round((gaps + 1) * 0.3) up
    to round((gaps + 1) * 0.7), the warm-up and the drain tail left out; requests/s is one over their mean gap,
    tokens/s the output tokens of the requests those gaps end on over the time they span. finish_ns and outputs:
    [finished requests]. NaN where fewer than 4 requests finished or the window spans no time."""
    if finish_ns.size < 4:
        return math.nan, math.nan
    order = np.argsort(finish_ns, kind="stable")
    times, tokens = finish_ns[order], outputs[order]  # [finished] each, by completion
    gaps = times.size - 1
    low, high = round((gaps + 1) * STEADY_WINDOW[0]), round((gaps + 1) * STEADY_WINDOW[1])
    span_s = (times[high] - times[low]) / _NS
    if high <= low or span_s <= 0:
        return math.nan, math.nan
    return float(tokens[low + 1:high + 1].sum() / span_s), (high - low) / span_s


class Simulation:
    """One run: a fresh Scheduler of a policy (one of apex_tools.sim.variants.VARIANTS; default config.policy) driven
    through every request (in arrival order) by run(). After it, ttft_s and tpot_ms hold each request's latencies."""

    def __init__(self, setup: Setup, requests: list[SimRequest], config: SchedulerConfig, workload: str = "",
                 policy: str | None = None, neo_launch_ms: float = NEO_LAUNCH_MS) -> None:
        self.name = policy or config.policy
        run = variant(self.name, setup, config, neo_launch_ms)
        self.setup = setup = run.setup
        self.requests = requests
        self.config = config = run.config
        self.workload = workload
        model = setup.cost_model() if config.hybrid else None
        self.scheduler = Scheduler(config, setup.worker, cost_model=model, policy=run.policy(model))
        self.truth = setup.cost_model()
        self.ttft_s = np.full(len(requests), math.nan)  # [n] arrival to first token; NaN: none
        self.tpot_ms = np.full(len(requests), math.nan)  # [n] first to last token over the tokens after the first
        self.produced = [0] * len(requests)  # output tokens of each finished request
        self.rejected = 0
        self._token = _token_not_stopping(setup)

    def run(self) -> RunResult:
        """Simulate until every request finished or was refused; see the module docstring."""
        started = time.perf_counter()
        scheduler, config, requests, token = self.scheduler, self.config, self.requests, self._token
        n = len(requests)
        arrival_ns = [r.arrival_s * _NS for r in requests]
        first_ns = [math.nan] * n
        finish_ns = [math.nan] * n
        backlog: deque[int] = deque()  # arrived, not yet accepted by the scheduler
        queue_full = False  # the scheduler refused the backlog's head: its queue is full until a plan admits some
        next_arrival = 0
        now = arrival_ns[0] if n else 0.0
        tally = _Tally()
        while True:
            while next_arrival < n and arrival_ns[next_arrival] <= now:
                backlog.append(next_arrival)
                next_arrival += 1
            while backlog and not queue_full:
                queue_full = not self._add(backlog[0])
                if not queue_full:
                    backlog.popleft()
            plan = scheduler.schedule()
            if plan.is_empty:
                stats = scheduler.stats()
                if stats.num_running or stats.num_waiting:
                    raise RuntimeError(f"{config.policy}: the scheduler planned nothing with {stats.num_running} "
                                       f"running and {stats.num_waiting} waiting")
                if next_arrival == n and not backlog:
                    break
                queue_full = False  # nothing waits
                now = max(now, arrival_ns[next_arrival])
                continue
            if plan.new_requests:  # the waiting requests leave the queue only by admission (or resumption)
                queue_full = False
            flight = scheduler.in_flight
            assert flight is not None, "a non-empty plan is in flight"
            shape, record = flight.shape, flight.record
            assert shape is not None and record is not None, "a non-empty plan has a shape and a record"
            swap_ns = _swap_ns(self.setup, plan) if plan.swap_out or plan.swap_in else 0.0
            step_ns = self.truth.predict_raw(shape).total_ns + swap_ns
            now += step_ns
            tally.add(record, step_ns, swap_ns)
            sampled = {r.request_id: token for r in flight.sampling()}  # a chunk short of its end samples nothing
            for out in scheduler.update_from_output(plan, StepOutput(plan.step_id, sampled, _UNMEASURED)).outputs:
                if out.num_output_tokens == 1 or out.finished:
                    i = int(out.request_id)
                    if math.isnan(first_ns[i]):
                        first_ns[i] = now
                    if out.finished:
                        finish_ns[i] = now
                        self.produced[i] = out.num_output_tokens
        return self._result(tally, arrival_ns, first_ns, finish_ns, time.perf_counter() - started)

    def _add(self, i: int) -> bool:
        """Offers request i to the scheduler; False while max_queued_requests wait (it stays in the backlog)."""
        r = self.requests[i]
        sampling = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        try:
            self.scheduler.add_request(str(i), [self._token] * r.prompt_len, sampling)
        except ResourceExhausted:
            return False
        except InvalidArgument as exc:
            self.rejected += 1
            logger.debug("request %d refused: %s", i, exc)
        return True

    def _result(self, tally: _Tally, arrival_ns: list[float], first_ns: list[float], finish_ns: list[float],
                wall_s: float) -> RunResult:
        arrival, first, finish = np.array(arrival_ns), np.array(first_ns), np.array(finish_ns)  # [n] each
        outputs = np.array(self.produced)  # [n]
        done = ~np.isnan(finish)  # [n]
        self.ttft_s = np.where(done, (first - arrival) / _NS, math.nan)
        multi = done & (outputs > 1)
        self.tpot_ms = np.where(multi, (finish - first) / np.maximum(outputs - 1, 1) / 1e6, math.nan)
        ttft, tpot = self.ttft_s[done], self.tpot_ms[multi]
        duration = float((finish[done].max() - arrival.min()) / _NS) if done.any() else 0.0
        tokens = int(outputs[done].sum())
        steady_tok_s, steady_req_s = steady_window(finish[done], outputs[done])
        iterations = sum(tally.modes.values())
        per_iteration = 1.0 / iterations if iterations else 0.0
        hybrid = sum(tally.layouts.values())
        stats = self.scheduler.stats()
        return RunResult(
            policy=self.name,
            hardware=self.setup.hardware,
            model=self.setup.model,
            workload=self.workload,
            num_requests=len(self.requests),
            finished=int(done.sum()),
            rejected=self.rejected,
            output_tokens=tokens,
            duration_s=duration,
            throughput_tok_s=tokens / duration if duration > 0 else 0.0,
            ttft_p50_s=_percentile(ttft, 50),
            ttft_p99_s=_percentile(ttft, 99),
            tpot_p50_ms=_percentile(tpot, 50),
            tpot_p99_ms=_percentile(tpot, 99),
            iterations=iterations,
            mode_mix={mode.value: count * per_iteration for mode, count in tally.modes.items()},
            layout_mix={layout.value: count / hybrid for layout, count in tally.layouts.items()},
            mean_gpu_rows=tally.gpu_rows * per_iteration,
            mean_cpu_rows=tally.cpu_rows * per_iteration,
            mean_prefills=tally.prefills * per_iteration,
            preemptions=stats.num_preemptions,
            swaps=stats.num_swaps,
            swap_time_share=tally.swap_ns / tally.step_ns if tally.step_ns else 0.0,
            prefill_time_share=tally.prefill_ns / tally.step_ns if tally.step_ns else 0.0,
            wall_s=wall_s,
            steady_throughput_tok_s=steady_tok_s,
            steady_req_s=steady_req_s,
        )
