"""Gateway benchmark: N concurrent streams through the gateway against the same streams sent to
the scheduler directly, in one run on one stack. Reports inter-token latency p50/p99 on both
paths (in steady decode, once every stream has its first token) and their difference: the
latency per token the gateway adds (detokenize, stop strings, one more gRPC hop). The direct
path is one Submit stream per request; the gateway reaches the scheduler over its Attach stream,
where a step's outputs for every stream are one message, so the scheduler's side of the hop is
cheaper on that path. The two paths alternate, --rounds times each."""

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from apex_serve import convert, rpc
from apex_serve.logs import configure_logging
from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.default_model import DEFAULT_SPEC, write_random_llama
from apex_tools.launcher import Stack, StackConfig
from gateway.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def _steady_gaps_ms(streams: list[list[int]]) -> list[float]:
    """Inter-token gaps once every stream has its first token: prefill stalls (prompts are not
    chunked) depend on how arrivals batch up, which differs between the two paths."""
    start = max(stamps[0] for stamps in streams)
    return [(b - a) / 1e6 for stamps in streams for a, b in zip(stamps, stamps[1:]) if a >= start]


async def _via_gateway(address: str, prompts: list[str], sampling: SamplingParams) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(prompt: str) -> list[int]:
            request = gateway_pb2.GenerateRequest(prompt=prompt, sampling=convert.sampling_to_pb(sampling))
            return [time.perf_counter_ns() async for msg in stub.Generate(request) if msg.HasField("chunk")]

        return _steady_gaps_ms(await asyncio.gather(*(one(p) for p in prompts)))


async def _via_scheduler(address: str, prompts: list[list[int]], sampling: SamplingParams) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)

        async def one(i: int, prompt: list[int]) -> list[int]:
            request = scheduler_pb2.SubmitRequest(
                request_id=f"direct-{time.perf_counter_ns()}-{i}", prompt_token_ids=prompt,
                sampling=convert.sampling_to_pb(sampling),
            )
            return [time.perf_counter_ns() async for _ in stub.Submit(request)]

        return _steady_gaps_ms(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _percentiles(gaps: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(gaps, 50)), "p99_ms": float(np.percentile(gaps, 99))}


def run(streams: int, new_tokens: int, rounds: int) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory(prefix="apex-bench-", dir="/tmp") as tmp:
        model_dir = write_random_llama(Path(tmp) / DEFAULT_SPEC.name, DEFAULT_SPEC)
        tokenizer = load_tokenizer(model_dir)
        prompts = [f"Stream {i}: tell me something." for i in range(streams)]
        prompt_ids = [tokenizer.encode(p).ids for p in prompts]
        config = StackConfig(
            model_dir=str(model_dir), port=rpc.free_tcp_port(), http_port=0, run_dir=f"{tmp}/run",
            max_num_seqs=streams, metrics_port=0,
        )
        with Stack(config) as stack:
            scheduler = rpc.unix_address(f"{tmp}/run", "scheduler")
            asyncio.run(_via_gateway(stack.config.gateway_address, prompts[:8], sampling))  # warm-up
            results: dict[str, list[dict[str, float]]] = {"gateway": [], "scheduler": []}
            for _ in range(rounds):
                results["scheduler"].append(_percentiles(asyncio.run(_via_scheduler(scheduler, prompt_ids, sampling))))
                gaps = asyncio.run(_via_gateway(stack.config.gateway_address, prompts, sampling))
                results["gateway"].append(_percentiles(gaps))
    summary = {
        path: {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms")} for path, runs in results.items()
    }
    summary["added_by_gateway"] = {k: summary["gateway"][k] - summary["scheduler"][k] for k in ("p50_ms", "p99_ms")}
    return {"streams": streams, "new_tokens": new_tokens, "rounds": rounds, "runs": results, "summary": summary}


def report(result: dict) -> str:
    s = result["summary"]
    lines = [f"{'path':<22}{'ITL p50 ms':>12}{'ITL p99 ms':>12}", "-" * 46]
    for path in ("scheduler", "gateway", "added_by_gateway"):
        lines.append(f"{path:<22}{s[path]['p50_ms']:>12.2f}{s[path]['p99_ms']:>12.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("bench-gateway")
    parser = argparse.ArgumentParser(prog="apex-serve bench-gateway", description=__doc__)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_results/gateway.json")
    args = parser.parse_args(argv)
    result = run(args.streams, args.new_tokens, args.rounds)
    logger.info(
        "%d concurrent streams, %d tokens each, median of %d rounds per path\n%s",
        args.streams, args.new_tokens, args.rounds, report(result),
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
