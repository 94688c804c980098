"""Structured outputs benchmark: whether constrained generations hold to their grammar at scale, and what the grammar
mask costs the rows that do not use it, on the default random model through the OpenAI HTTP endpoint.

Loads, each a set of streamed requests submitted at once (the scheduler runs max_num_seqs of them at a time):
- json: chat completions under `response_format` json_schema (SCHEMA: a nested object, an enum, an array with
  maxItems, integer bounds, strings with maxLength), temperature 1, max_tokens enough to close. Each reply must parse
  and validate against the schema (jsonschema) and end with finish_reason "stop".
- choice: completions under vLLM's `guided_choice` (CHOICES), temperature 1; each reply must be one of the choices.
- both again on a stack under `--policy apex` with a device pool of a few blocks, so that the constrained requests
  live on the CPU pool; the scheduler's hybrid iterations and the CPU rows' share of the rows are reported.
- cost: M unconstrained completions (temperature 1, ignore_eos, fixed length) measured alone, beside M unconstrained
  chat requests (the anchor), and beside M json requests, in one run, the three arms in rotating order, `repeats`
  times. The anchor's partners are the json requests without their grammar, each held (ignore_eos) to the length
  the same request and seed produced in the json load, so the two "beside" arms differ only in the grammar. The
  partners are not streamed: a streamed json reply arrives in about 1.7 times the chunks of its unconstrained twin
  (random bytes are held back until they form characters), and on a machine of two cores the gateway's and the
  clients' work for those chunks would slow the rows as much as the grammar does.
  Throughput (the rows' output tokens over their span) and TPOT p50/p99 (per row, last chunk minus first chunk over
  tokens - 1) are the medians over the repeats, beside the gpu_worker's own median step time while every row decodes
  (the engine's share, free of the gateway and the clients); the mask's cost is beside-json over the anchor.
--tiny runs a few requests of each load on the apex stack alone (start-up and profiling are most of its time).

The random model samples every allowed token at comparable odds, so its outputs exercise far more of each grammar
(escapes, multi-byte characters, whitespace) than a trained model's would.
Written: JSON (--out) and a markdown table next to it (.md).
"""

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from apex_serve import rpc
from apex_serve.logs import configure_logging
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.bench.openai_http import Reply, run_all
from apex_tools.default_model import DEFAULT_SPEC, write_random_llama
from apex_tools.launcher import Stack, StackConfig

logger = logging.getLogger(__name__)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "role", "age", "tags", "address"],
    "additionalProperties": False,
}
CHOICES = ["positive", "negative", "neutral"]


POOLS = {  # a stack per pool: its StackConfig fields beyond the setup's
    "device_pool": {"policy": "gpu-only"},
    "cpu_pool": {"policy": "apex"},  # and a device pool of setup.cpu_pool_device_blocks
}


@dataclass(frozen=True)
class Setup:
    json_requests: int  # the json load, on each stack
    choice_requests: int  # the choice load, on each stack
    json_max_tokens: int  # enough for any reply under SCHEMA to close
    max_num_seqs: int
    cpu_pool_device_blocks: int  # the apex stack's device pool: too small for the json requests
    rows: int  # M: unconstrained rows measured in the cost arms, and partners beside them
    row_tokens: int  # output tokens of each unconstrained row
    repeats: int  # of the cost arms
    pools: tuple[str, ...]  # the stacks, in order; the cost arms run on the first

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if not self.pools or not set(self.pools) <= set(POOLS):
            raise ValueError(f"pools: must be some of {tuple(POOLS)}, got {self.pools}")


SETUPS = {
    "full": Setup(json_requests=100, choice_requests=100, json_max_tokens=512, max_num_seqs=32,
                  cpu_pool_device_blocks=8, rows=16, row_tokens=128, repeats=9, pools=("device_pool", "cpu_pool")),
    # one stack: the cost arms' rows fit the device pool there
    "tiny": Setup(json_requests=3, choice_requests=3, json_max_tokens=512, max_num_seqs=8,
                  cpu_pool_device_blocks=8, rows=2, row_tokens=8, repeats=1, pools=("cpu_pool",)),
}


def json_request(model: str, i: int, max_tokens: int) -> tuple[str, dict]:
    return "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": f"Describe user {i} as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA}},
        "temperature": 1.0, "max_tokens": max_tokens, "seed": i,
    }


def choice_request(model: str, i: int) -> tuple[str, dict]:
    return "/v1/completions", {
        "model": model, "prompt": f"Review {i}: the sentiment is", "guided_choice": CHOICES,
        "temperature": 1.0, "max_tokens": 16, "seed": i,
    }


def row_request(model: str, i: int, tokens: int) -> tuple[str, dict]:
    """An unconstrained completion of exactly tokens tokens."""
    return "/v1/completions", {
        "model": model, "prompt": f"Row {i}:", "temperature": 1.0, "max_tokens": tokens, "ignore_eos": True,
        "seed": 1000 + i,
    }


def partner_request(model: str, i: int, tokens: int) -> tuple[str, dict]:
    """The json request's twin without its grammar: the same messages, exactly tokens tokens."""
    path, body = json_request(model, i, tokens)
    del body["response_format"]
    return path, body | {"ignore_eos": True}


def json_problem(text: str) -> str | None:
    """Why text is not a document SCHEMA accepts; None when it is."""
    import jsonschema  # a development dependency: only this benchmark and its tests need it

    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(document))
    return None if error is None else f"schema: {error.message}"


def choice_problem(text: str) -> str | None:
    return None if text in CHOICES else f"not a choice: {text!r}"


def reply_problem(reply: Reply, problem: Callable[[str], str | None]) -> str | None:
    """Why a reply does not hold to its grammar: an HTTP or stream error, a text that problem refuses, or an end
    other than "stop" (the grammar did not close); None when it holds."""
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.error}"
    if reply.error:
        return reply.error
    return problem(reply.text) or (None if reply.finish_reason == "stop" else f"finish_reason {reply.finish_reason}")


def load_metrics(replies: list[Reply], problem: Callable[[str], str | None], elapsed_s: float) -> dict:
    """How many replies hold to the grammar (and ended with "stop"), the first few that did not, tokens/s and
    end-to-end latency."""
    failures = [{"request": i, "why": why[:300], "text": r.text[:200]}
                for i, r in enumerate(replies) if (why := reply_problem(r, problem))]
    latency = [(r.last_ns - r.submit_ns) / 1e9 for r in replies if r.last_ns]
    tokens = sum(r.completion_tokens for r in replies)
    return {
        "requests": len(replies), "valid": len(replies) - len(failures), "failures": failures[:5],
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in replies)),
        "output_tokens": tokens, "tokens_per_reply_max": max((r.completion_tokens for r in replies), default=0),
        "elapsed_s": elapsed_s, "tokens_per_s": tokens / elapsed_s if elapsed_s else 0.0,
        **({"latency_p50_s": float(np.percentile(latency, 50)), "latency_p99_s": float(np.percentile(latency, 99))}
           if latency else {}),
    }


def _stats(stack: Stack) -> scheduler_pb2.SchedulerStats:
    with grpc.insecure_channel(rpc.unix_address(stack.config.run_dir, "scheduler")) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(scheduler_pb2.GetStatsRequest())


def scheduler_stats(stack: Stack, before: scheduler_pb2.SchedulerStats | None = None) -> dict:
    """The scheduler's iterations by mode since before (None: since start), and the CPU rows' share of the rows over
    those of its recent iterations (the latest 256) that ran since before."""
    stats = _stats(stack)
    since = {} if before is None else dict(before.iterations_by_mode)
    by_mode = {mode: n - since.get(mode, 0) for mode, n in stats.iterations_by_mode.items()}
    first = -1 if before is None else before.last_iteration.step_id
    recent = [it for it in stats.recent_iterations if it.step_id > first]
    rows = sum(it.gpu_rows + it.cpu_rows for it in recent)
    return {
        "iterations_by_mode": by_mode, "hybrid_iterations": sum(n for m, n in by_mode.items() if m != "gpu_only"),
        "recent_cpu_row_share": sum(it.cpu_rows for it in recent) / rows if rows else 0.0,
    }


def run_load(stack: Stack, requests: list[tuple[str, dict]], problem: Callable[[str], str | None]) -> dict:
    """The requests at once: how they held to their grammar, and the scheduler's iterations that ran them."""
    before = _stats(stack)
    started = time.perf_counter()
    replies = run_all(stack.config.http_address, requests)
    metrics = load_metrics(replies, problem, time.perf_counter() - started)
    metrics["completion_tokens"] = [r.completion_tokens for r in replies]
    metrics["scheduler"] = scheduler_stats(stack, before)
    return metrics


def constrained_loads(stack: Stack, setup: Setup) -> dict:
    """The json load, then the choice load, on one stack."""
    model = Path(stack.config.model_dir).name
    return {
        "json": run_load(stack, [json_request(model, i, setup.json_max_tokens) for i in range(setup.json_requests)],
                         json_problem),
        "choice": run_load(stack, [choice_request(model, i) for i in range(setup.choice_requests)], choice_problem),
    }


def row_metrics(replies: list[Reply]) -> dict:
    """The unconstrained rows' throughput over their span and TPOT per row."""
    span_s = (max(r.last_ns for r in replies) - min(r.submit_ns for r in replies)) / 1e9
    tpot = [(r.last_ns - r.first_ns) / (r.completion_tokens - 1) / 1e6 for r in replies if r.completion_tokens > 1]
    return {
        "output_tokens": sum(r.completion_tokens for r in replies), "span_s": span_s,
        "tokens_per_s": sum(r.completion_tokens for r in replies) / span_s,
        "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p99_ms": float(np.percentile(tpot, 99)),
        "errors": [r.error[:200] for r in replies if r.status != 200 or r.error],
    }


def engine_step_ms(stack: Stack, before: scheduler_pb2.SchedulerStats, rows: int) -> float:
    """The median time the gpu_worker measured for a decode step of all rows since before (from the scheduler's
    latest 256 iterations): the engine's share of the cost, without the gateway and the clients."""
    first = before.last_iteration.step_id
    steps = [it.measured_ns / 1e6 for it in _stats(stack).recent_iterations
             if it.step_id > first and it.num_prefills == 0 and it.gpu_rows + it.cpu_rows == rows and it.measured_ns]
    return statistics.median(steps) if steps else float("nan")


ARMS = ("alone", "beside_unconstrained", "beside_json")


def cost_arms(stack: Stack, setup: Setup, partner_tokens: list[int]) -> dict:
    """The rows alone, beside unconstrained partners and beside json partners, in rotating order, repeats times:
    each arm's runs and the medians of its metrics, and beside-json over beside-unconstrained."""
    model, address = Path(stack.config.model_dir).name, stack.config.http_address
    rows = [row_request(model, i, setup.row_tokens) for i in range(setup.rows)]
    partners = {
        "alone": [],
        "beside_unconstrained": [partner_request(model, i, partner_tokens[i % len(partner_tokens)])
                                 for i in range(setup.rows)],
        "beside_json": [json_request(model, i, setup.json_max_tokens) for i in range(setup.rows)],
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for repeat in range(setup.repeats):
        for k in range(len(ARMS)):
            arm = ARMS[(repeat + k) % len(ARMS)]
            before = _stats(stack)
            replies = run_all(address, rows, partners[arm])
            runs[arm].append(row_metrics(replies[: setup.rows])
                             | {"partner_tokens": [r.completion_tokens for r in replies[setup.rows:]],
                                "engine_step_ms": engine_step_ms(stack, before, len(rows) + len(partners[arm]))})
    keys = ("tokens_per_s", "tpot_p50_ms", "tpot_p99_ms", "engine_step_ms")
    median = {arm: {k: statistics.median(run[k] for run in runs[arm]) for k in keys} for arm in ARMS}
    anchor = median["beside_unconstrained"]
    return {"runs": runs, "median": median,
            "json_over_anchor": {k: median["beside_json"][k] / anchor[k] for k in keys}}


def _stack_config(model_dir: Path, run_dir: str, profile_dir: str, setup: Setup, **overrides: object) -> StackConfig:
    fields: dict[str, object] = {
        "model_dir": str(model_dir), "port": rpc.free_tcp_port(), "http_port": rpc.free_tcp_port(),
        "metrics_port": 0, "run_dir": run_dir, "profile_dir": profile_dir, "max_num_seqs": setup.max_num_seqs,
        "policy": "gpu-only",
    }
    return StackConfig(**(fields | overrides))  # type: ignore[arg-type]


def run(setup: Setup, profile_dir: str | None) -> dict:
    """A stack per pool of the setup, each running the constrained loads; the first also runs the cost arms."""
    result: dict = {"setup": asdict(setup), "model": asdict(DEFAULT_SPEC), "schema": SCHEMA, "choices": CHOICES,
                    "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="apex-so-", dir="/tmp") as tmp:
        model_dir = write_random_llama(Path(tmp) / DEFAULT_SPEC.name, DEFAULT_SPEC)
        for pool in setup.pools:
            overrides = POOLS[pool] | ({"num_kv_blocks": setup.cpu_pool_device_blocks} if pool == "cpu_pool" else {})
            config = _stack_config(model_dir, f"{tmp}/run", profile_dir or f"{tmp}/profiles", setup, **overrides)
            with Stack(config) as stack:
                loads = constrained_loads(stack, setup)
                if "cost" not in result:
                    result["cost"] = {"pool": pool, **cost_arms(stack, setup, loads["json"]["completion_tokens"])}
            result[pool] = loads
    return result


def markdown(result: dict) -> str:
    s, model = result["setup"], result["model"]
    labels = {"device_pool": "gpu-only", "cpu_pool": f"apex, {s['cpu_pool_device_blocks']} device blocks"}
    lines = [
        (f"Default random model ({model['num_layers']} layers, hidden {model['hidden_size']}), {result['cores']} "
         f"cores, gpu_worker on one; max_num_seqs {s['max_num_seqs']}; every load submitted at once, temperature 1. "
         f"json: {s['json_requests']} chat requests under response_format json_schema, max_tokens "
         f"{s['json_max_tokens']}; choice: {s['choice_requests']} completions under guided_choice. Valid: parses, "
         f"validates (or is a choice) and ends with finish_reason stop. Hybrid iterations: the load's iterations in a "
         f"hybrid mode; CPU row share: of the rows of its latest 256 iterations."),
        "",
        "| load | stack | valid | tokens/s | latency p50 s | latency p99 s | hybrid iterations | CPU row share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pool in s["pools"]:
        for load in ("json", "choice"):
            m = result[pool][load]
            sched = m["scheduler"]
            lines.append(
                f"| {load} | {labels[pool]} | {m['valid']}/{m['requests']} | {m['tokens_per_s']:.0f} | "
                f"{m.get('latency_p50_s', 0):.2f} | {m.get('latency_p99_s', 0):.2f} | {sched['hybrid_iterations']} | "
                f"{sched['recent_cpu_row_share']:.2f} |")
    cost = result["cost"]
    lines += [
        "",
        (f"Cost to unconstrained rows ({labels[cost['pool']]}): {s['rows']} completions of {s['row_tokens']} tokens "
         f"(temperature 1, ignore_eos) alone, beside {s['rows']} unconstrained chat requests of the json load's "
         f"lengths, and beside {s['rows']} json requests; medians of {s['repeats']} runs in rotating order."),
        "",
        "| rows | tokens/s | TPOT p50 ms | TPOT p99 ms | engine step ms (all rows decoding) |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        m = cost["median"][arm]
        lines.append(f"| {arm.replace('_', ' ')} | {m['tokens_per_s']:.1f} | {m['tpot_p50_ms']:.2f} | "
                     f"{m['tpot_p99_ms']:.2f} | {m['engine_step_ms']:.2f} |")
    r = cost["json_over_anchor"]
    lines.append(f"| beside json / beside unconstrained | {r['tokens_per_s']:.3f} | {r['tpot_p50_ms']:.3f} | "
                 f"{r['tpot_p99_ms']:.3f} | {r['engine_step_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("bench-structured")
    parser = argparse.ArgumentParser(prog="apex-serve bench-structured", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few requests of each load (the smoke test)")
    parser.add_argument("--requests", type=int, help="requests of the json and choice loads (default 100)")
    parser.add_argument("--rows", type=int, help="M, the unconstrained rows of the cost arms (default 16)")
    parser.add_argument("--repeats", type=int,
                        help="runs of each cost arm (default 9: one run of an arm varies by about 7%%)")
    parser.add_argument("--profile-dir", help="profiles of the apex stack (default: a fresh directory)")
    parser.add_argument("--out", default="bench_results/structured.json")
    args = parser.parse_args(argv)
    setup = SETUPS["tiny" if args.tiny else "full"]
    overrides = {"json_requests": args.requests, "choice_requests": args.requests, "rows": args.rows,
                 "repeats": args.repeats}
    setup = Setup(**(asdict(setup) | {k: v for k, v in overrides.items() if v is not None}))
    result = run(setup, args.profile_dir)
    table = markdown(result)
    logger.info("\n%s", table)
    out = write_result(args.out, result)
    out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
