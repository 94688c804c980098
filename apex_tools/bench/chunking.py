"""Chunked prefill benchmark: what long prompts arriving among running decodes cost those decodes, with a per-step
token budget that splits the prompts into chunks against one that admits a whole prompt, in one run.

The stack: the small default LLaMA on a gpu_worker pinned to the first core (torch on one thread, exclusive) with a
device pool that holds the whole load (so no request waits for blocks or is preempted: the budget is the only
difference); the scheduler and this client on the second core. With --policy neo or apex the cpu_attention_worker
and the profiler run on the second core too, and the profile is measured once, before the runs.

The load (a Setup), the same for each budget: `decodes` requests with short prompts and long outputs are submitted
at once; once the first of them has streamed `first_arrival_after` tokens a long prompt arrives, then another every
`arrival_every` tokens of that stream, `long_prompts` in all. Every request is greedy with ignore_eos, submitted as
token ids through the scheduler's Submit stream, and each token's arrival time is recorded. For each budget a fresh
scheduler (`--max-num-batched-tokens B`) runs the whole load against the same gpu_worker, `--repeats` times, the two
budgets alternating in order (chunked first, then whole first, ...) so that a drift of the machine falls on both;
the table reports each metric's median over the repeats, the timeline and the plot the first repeat's.

Measured per budget: the decodes' TPOT (per request, (last token - first token) / (tokens - 1)) p50 and p99, and
their inter-token gaps p50, p99 and max (a prefill that stalls every decode shows there); the long prompts' TTFT p50
and max; the iteration timeline of the first long arrival: every step from its submission to its first token (step
id, mode, prefill rows, prefill tokens where the scheduler's records carry them, decode rows, measured and predicted
ms), read from the scheduler's GetStats. TPOT per request averages a request's stalls over its output; the gaps show
them one by one, which is what a smaller budget bounds.
Written: JSON (--out), a markdown table next to it (.md) and a plot (.png).
"""

import argparse
import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np

from apex_serve import convert
from apex_serve.logs import configure_logging
from apex_serve.types import SamplingParams
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from apex_tools.bench.chunking_report import markdown, plot
from apex_tools.bench.common import one_core, write_result
from apex_tools.bench.serving_stack import (
    BLOCK_SIZE,
    BenchStack,
    Preset,
    Workload,
    plain,
    profile,
    running_stack,
    scheduler_stats,
    start_gpu_worker,
    worker_info,
)
from apex_tools.default_model import DEFAULT_SPEC

logger = logging.getLogger(__name__)
POLICIES = ("gpu-only", "neo", "apex")
STATS_POLL_S = 0.2  # how often the scheduler's recent iterations are read during a run


@dataclass(frozen=True)
class Setup:
    decodes: int
    decode_prompt_len: int
    decode_output_len: int
    long_prompts: int
    long_prompt_len: int
    long_output_len: int
    first_arrival_after: int  # tokens of the first decode stream before the first long prompt is submitted
    arrival_every: int  # tokens of that stream between long prompts
    chunked_budget: int  # --max-num-batched-tokens that splits a long prompt
    whole_budget: int  # one that admits a whole long prompt with every decode

    @property
    def max_num_seqs(self) -> int:
        return self.decodes + self.long_prompts

    def workloads(self) -> tuple[Workload, Workload]:
        """The decodes and the long prompts (token ids drawn with fixed seeds)."""
        return (
            Workload("decodes", self.decodes, (self.decode_prompt_len,) * 2, (self.decode_output_len,) * 2, seed=1),
            Workload("long-prompts", self.long_prompts, (self.long_prompt_len,) * 2, (self.long_output_len,) * 2,
                     seed=2),
        )

    def preset(self) -> Preset:
        return Preset(DEFAULT_SPEC, self.workloads(), self.max_num_seqs, profile_warmup=0, profile_repeats=1)

    def device_blocks(self) -> int:
        """A device pool for the whole load, one spare block per request."""
        tokens = sum(w.working_set_tokens() for w in self.workloads())
        return math.ceil(tokens / BLOCK_SIZE) + self.max_num_seqs


SETUPS = {
    "full": Setup(decodes=16, decode_prompt_len=32, decode_output_len=192, long_prompts=4, long_prompt_len=1536,
                  long_output_len=8, first_arrival_after=16, arrival_every=40, chunked_budget=512, whole_budget=8192),
    "tiny": Setup(decodes=2, decode_prompt_len=16, decode_output_len=24, long_prompts=1, long_prompt_len=192,
                  long_output_len=4, first_arrival_after=4, arrival_every=4, chunked_budget=64, whole_budget=1024),
}


@dataclass
class Stream:
    """One request: its submission, its tokens' arrival times, and the scheduler's last step id at both ends of its
    wait for a first token (-1: not read)."""

    submit_ns: int = 0
    token_ns: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    step_at_submit: int = -1
    step_at_first_token: int = -1


async def _last_step(stub: scheduler_pb2_grpc.SchedulerStub) -> int:
    return (await stub.GetStats(scheduler_pb2.GetStatsRequest())).last_iteration.step_id


async def _stream(stub: scheduler_pb2_grpc.SchedulerStub, record: Stream, request_id: str, prompt: list[int],
                  max_tokens: int, progress: asyncio.Condition | None = None, watch_steps: bool = False) -> Stream:
    """One Submit stream read to its end into record; progress is notified on each message; watch_steps: the
    scheduler's last step id is read at submission and at the first token."""
    if watch_steps:
        record.step_at_submit = await _last_step(stub)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    request = scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=prompt,
                                          sampling=convert.sampling_to_pb(sampling))
    record.submit_ns = time.perf_counter_ns()
    async for msg in stub.Submit(request):
        now = time.perf_counter_ns()
        first = not record.token_ns
        record.token_ns += [now] * len(msg.token_ids)
        if msg.finished:
            reason = convert.finish_reason_from_pb(msg.finish_reason)
            record.finish_reason = None if reason is None else reason.value
        if first and watch_steps and msg.token_ids:
            record.step_at_first_token = await _last_step(stub)
        if progress is not None:
            async with progress:
                progress.notify_all()
    return record


async def _poll_iterations(stub: scheduler_pb2_grpc.SchedulerStub, log: dict[int, dict], stop: asyncio.Event) -> None:
    """Every STATS_POLL_S until stop (and once after): the scheduler's recent iterations merged into log by step id."""
    while True:
        stats = await stub.GetStats(scheduler_pb2.GetStatsRequest())
        for it in stats.recent_iterations:
            log[it.step_id] = plain(it)  # a later read carries the measured time of a step read while it ran
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), STATS_POLL_S)
        except TimeoutError:
            pass


async def _run_load(address: str, setup: Setup, run_id: str) -> tuple[int, list[Stream], list[Stream], dict[int, dict]]:
    """The load against the scheduler at address: (start ns, decode streams, long-prompt streams, iterations by
    step id)."""
    decodes, longs = (w.requests() for w in setup.workloads())
    decode_streams = [Stream() for _ in decodes]
    long_streams = [Stream() for _ in longs]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        log: dict[int, dict] = {}
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_iterations(stub, log, stop))
        progress = asyncio.Condition()
        start = time.perf_counter_ns()
        tasks = [asyncio.create_task(_stream(stub, record, f"{run_id}-decode-{i}", prompt, n, progress))
                 for i, (record, (prompt, n)) in enumerate(zip(decode_streams, decodes, strict=True))]
        watched = decode_streams[0]
        for k, (record, (prompt, n)) in enumerate(zip(long_streams, longs, strict=True)):
            after = setup.first_arrival_after + k * setup.arrival_every
            async with progress:
                await progress.wait_for(lambda after=after: len(watched.token_ns) >= after or tasks[0].done())
            tasks.append(asyncio.create_task(_stream(stub, record, f"{run_id}-long-{k}", prompt, n, watch_steps=True)))
        try:
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            await poller
    return start, decode_streams, long_streams, log


def _ms_percentiles(values: list[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_p50_ms": float(np.percentile(values, 50)), f"{prefix}_p99_ms": float(np.percentile(values, 99)),
            f"{prefix}_max_ms": float(max(values))}


def decode_metrics(start_ns: int, streams: list[Stream]) -> dict:
    """The decodes' TPOT per request and inter-token gaps (each with the time since start it ended, in s)."""
    tpot = [(s.token_ns[-1] - s.token_ns[0]) / (len(s.token_ns) - 1) / 1e6 for s in streams if len(s.token_ns) > 1]
    gaps = [((b - start_ns) / 1e9, (b - a) / 1e6) for s in streams for a, b in zip(s.token_ns, s.token_ns[1:])]
    return {
        "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99)),
        **_ms_percentiles([g for _, g in gaps], "gap"), "gaps": gaps,
    }


def long_metrics(start_ns: int, streams: list[Stream]) -> dict:
    """The long prompts' arrival (s since start) and TTFT."""
    ttft = [(s.token_ns[0] - s.submit_ns) / 1e6 for s in streams if s.token_ns]
    return {"arrivals_s": [(s.submit_ns - start_ns) / 1e9 for s in streams], "ttft_ms": ttft,
            **({"ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_max_ms": float(max(ttft))} if ttft else {})}


def timeline(log: dict[int, dict], stream: Stream) -> dict:
    """Every step from a stream's submission to its first token, as the scheduler recorded it; complete: no step in
    that range was missed between two reads of the recent iterations."""
    ids = range(stream.step_at_submit + 1, stream.step_at_first_token + 1)
    steps = []
    for step_id in ids:
        it = log.get(step_id)
        if it is None:
            continue
        steps.append({
            "step_id": step_id, "mode": it.get("mode"), "num_prefills": it.get("num_prefills", 0),
            "prefill_tokens": it.get("prefill_tokens", 0),
            "decode_rows": it.get("gpu_rows", 0) + it.get("cpu_rows", 0),
            "measured_ms": it.get("measured_ns", 0.0) / 1e6, "predicted_ms": it.get("predicted_ns", 0.0) / 1e6,
        })
    return {"first_step": ids.start, "last_step": ids.stop - 1, "complete": len(steps) == len(ids), "steps": steps}


def _scheduler_args(stack: BenchStack, setup: Setup, policy: str, budget: int) -> list[str]:
    args = ["--worker-address", stack.address("gpu"), "--policy", policy, "--max-num-seqs", str(setup.max_num_seqs),
            "--max-num-batched-tokens", str(budget)]
    return args + (["--profiler-address", stack.address("profiler")] if policy != "gpu-only" else [])


def run_budget(stack: BenchStack, setup: Setup, policy: str, budget: int) -> dict:
    """A fresh scheduler with this budget: one long prompt to warm up, then the load; its metrics."""
    address = stack.address("scheduler")
    scheduler = stack.start("scheduler_service", "scheduler", _scheduler_args(stack, setup, policy, budget))
    try:
        warm_prompt, _ = setup.workloads()[1].requests()[0]
        asyncio.run(_warm_up(address, warm_prompt, f"warm-{budget}"))
        start, decodes, longs, log = asyncio.run(_run_load(address, setup, f"b{budget}"))
        stats = scheduler_stats(address)
    finally:
        stack.services.stop(scheduler)
    expected = [n for _, n in setup.workloads()[0].requests()] + [n for _, n in setup.workloads()[1].requests()]
    received = [len(s.token_ns) for s in decodes + longs]
    return {
        "budget": budget, "lengths_ok": received == expected, "received_tokens": received,
        "finish_reasons": sorted({str(s.finish_reason) for s in decodes + longs}),
        "decodes": decode_metrics(start, decodes), "long_prompts": long_metrics(start, longs),
        "timeline": timeline(log, longs[0]), "iterations_seen": len(log),
        "scheduler": {k: stats.get(k) for k in ("num_preemptions", "num_swaps", "iterations_by_mode")},
    }


async def _warm_up(address: str, prompt: list[int], run_id: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await _stream(scheduler_pb2_grpc.SchedulerStub(channel), Stream(), run_id, prompt, 2)


SCALARS = {"decodes": ("tpot_p50_ms", "tpot_p99_ms", "gap_p50_ms", "gap_p99_ms", "gap_max_ms"),
           "long_prompts": ("ttft_p50_ms", "ttft_max_ms")}


def medians(runs: list[dict]) -> dict[str, float]:
    """Each scalar metric's median over the repeats of one budget."""
    return {key: float(np.median([r[part][key] for r in runs])) for part, keys in SCALARS.items() for key in keys}


def run(setup: Setup, policy: str, profile_dir: str | None, repeats: int) -> dict:
    preset = setup.preset()
    with running_stack(preset, profile_dir, "apx-chk-") as (stack, model_dir):
        grid = profile(stack, model_dir, preset) if policy != "gpu-only" else None
        worker = start_gpu_worker(stack, model_dir, setup.device_blocks(), preset)
        try:
            info = worker_info(stack.address("gpu"))
            budgets = {"chunked": setup.chunked_budget, "whole": setup.whole_budget}
            runs: dict[str, list[dict]] = {name: [] for name in budgets}
            for i in range(repeats):
                for name in (budgets if i % 2 == 0 else reversed(budgets)):
                    logger.info("repeat %d: %s, --max-num-batched-tokens %d under %s", i + 1, name, budgets[name],
                                policy)
                    runs[name].append(run_budget(stack, setup, policy, budgets[name]))
        finally:
            stack.services.stop(worker)
    summary = {name: medians(repeated) for name, repeated in runs.items()}
    chunked, whole = summary["chunked"], summary["whole"]
    return {
        "model": preset.spec.name, "policy": policy, "setup": asdict(setup), "profile_grid": grid,
        "load": {
            "device_cpu": one_core(stack.device_cpus), "host_cpu": one_core(stack.host_cpus), "torch_threads": 1,
            "device_kv_blocks": info.num_kv_blocks, "block_size": info.block_size, "max_num_seqs": setup.max_num_seqs,
            "decodes": setup.decodes, "decode_prompt_len": setup.decode_prompt_len,
            "decode_output_len": setup.decode_output_len, "long_prompts": setup.long_prompts,
            "long_prompt_len": setup.long_prompt_len, "long_output_len": setup.long_output_len,
            "arrivals_after_decode_tokens": [setup.first_arrival_after + k * setup.arrival_every
                                             for k in range(setup.long_prompts)],
        },
        "repeats": repeats,
        "runs": {name: repeated[0] for name, repeated in runs.items()},
        "repeated_runs": {name: [{part: {k: r[part][k] for k in keys} for part, keys in SCALARS.items()}
                                 for r in repeated] for name, repeated in runs.items()},
        "medians": summary,
        "lengths_ok": {name: all(r["lengths_ok"] for r in repeated) for name, repeated in runs.items()},
        "ratios": {"tpot_p99_chunked_over_whole": chunked["tpot_p99_ms"] / whole["tpot_p99_ms"],
                   "gap_p99_chunked_over_whole": chunked["gap_p99_ms"] / whole["gap_p99_ms"],
                   "gap_max_chunked_over_whole": chunked["gap_max_ms"] / whole["gap_max_ms"]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench-chunking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 decodes and one short long prompt: a smoke test")
    parser.add_argument("--policy", choices=POLICIES, default="gpu-only",
                        help="the scheduler's policy (neo and apex profile the workers first)")
    parser.add_argument("--chunked-budget", type=int, default=None, help="default: 512 (--tiny: 64)")
    parser.add_argument("--whole-budget", type=int, default=None, help="default: 8192 (--tiny: 1024)")
    parser.add_argument("--profile-dir", default=None, help="reuse profiles stored here (default: a fresh one)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each budget, alternating (default: 3; "
                        "--tiny: 1)")
    parser.add_argument("--out", default="bench_results/chunking.json")
    args = parser.parse_args(argv)
    configure_logging("bench-chunking")
    setup = SETUPS["tiny" if args.tiny else "full"]
    setup = replace(setup, chunked_budget=args.chunked_budget or setup.chunked_budget,
                    whole_budget=args.whole_budget or setup.whole_budget)
    if setup.chunked_budget < setup.max_num_seqs:
        parser.error(f"--chunked-budget: must be >= {setup.max_num_seqs} (a step for every running request), got "
                     f"{setup.chunked_budget}")
    whole_needs = setup.long_prompt_len + setup.decodes
    if setup.whole_budget < whole_needs:
        parser.error(f"--whole-budget: must admit a whole long prompt with every decode ({whole_needs} tokens), got "
                     f"{setup.whole_budget}")
    repeats = args.repeats or (1 if args.tiny else 3)
    if repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {repeats}")
    result = run(setup, args.policy, args.profile_dir, repeats)
    out = Path(args.out)
    table = markdown(result)
    logger.info("chunked prefill against whole prompts\n%s", table)
    write_result(str(out), result)
    out.with_suffix(".md").write_text(table + "\n")
    plot(result, out.with_suffix(".png"))
    logger.info("wrote %s and %s", out.with_suffix(".md"), out.with_suffix(".png"))
    return 0 if all(result["lengths_ok"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
