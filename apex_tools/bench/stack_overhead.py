"""Stack overhead benchmark: decode tokens/s of the full service stack against the same engine called
in-process (the service overhead ratio) and against `transformers` generate at batch 1. The stack runs twice, with
the scheduler's asynchronous scheduling on (the default) and off (--no-async-scheduling), both up at once, under the
in-process engine's policy (gpu-only). With --pin-cpus the in-process engine runs on the gpu_worker's cores and this
process's stack clients on the others, as the stack's services are pinned: neither path shares its engine's cores
with the client.

Every figure is decode throughput, (tokens - 1) / (time of last token - time of first token),
so prefill is excluded the same way on all three paths; each is the median of --repeats runs in
this run on the same model and thread count, the in-process and stack runs interleaved."""

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import grpc
import torch

from apex_serve import convert, rpc
from apex_serve.types import SamplingParams
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc
from apex_tools.bench.common import write_result
from apex_tools.default_model import BENCH_SPEC, DEFAULT_SPEC, RandomLlamaSpec, write_random_llama
from apex_tools.launcher import Stack, StackConfig
from apex_tools.local_engine import LocalEngine
from apex_tools.processes import pinned, split_cores
from gpu_worker.config import GpuWorkerConfig

logger = logging.getLogger(__name__)

PRESETS: dict[str, RandomLlamaSpec] = {"default": DEFAULT_SPEC, "bench": BENCH_SPEC}
PROMPT = "The benchmark prompt: "


def _decode_rate(first_ns: Sequence[int], last_ns: Sequence[int], new_tokens: int) -> float:
    """Aggregate decode tokens/s of requests that ran together."""
    return len(first_ns) * (new_tokens - 1) / ((max(last_ns) - max(first_ns)) / 1e9)


def bench_in_process(engine: LocalEngine, prompt_ids: list[int], batch: int, new_tokens: int) -> float:
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = [f"bench-{time.perf_counter_ns()}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.scheduler.add_request(request_id, prompt_ids, sampling)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    while len(last) < batch:
        plan = engine.scheduler.schedule()
        outputs = engine.scheduler.update_from_output(plan, engine.runner.execute(plan)).outputs
        now = time.perf_counter_ns()
        for out in outputs:
            first.setdefault(out.request_id, now)
            if out.finished:
                last[out.request_id] = now
    return _decode_rate(list(first.values()), list(last.values()), new_tokens)


async def _stream_one(stub: gateway_pb2_grpc.GatewayStub, sampling: SamplingParams) -> tuple[int, int]:
    request = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=convert.sampling_to_pb(sampling))
    first = last = 0
    async for msg in stub.Generate(request):
        if msg.WhichOneof("response") == "chunk":
            last = time.perf_counter_ns()
            first = first or last
    return first, last


async def bench_stack(address: str, batch: int, new_tokens: int) -> float:
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        times = await asyncio.gather(*(_stream_one(stub, sampling) for _ in range(batch)))
    return _decode_rate([t[0] for t in times], [t[1] for t in times], new_tokens)


class _TokenClock:
    """A transformers streamer that only records when each token arrives."""

    def __init__(self) -> None:
        self.stamps: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter_ns())

    def end(self) -> None:
        pass


def bench_transformers(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> float:
    clock = _TokenClock()
    input_ids = torch.tensor([prompt_ids])  # [1, prompt_len]
    with torch.inference_mode():
        model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, streamer=clock,
        )
    token_stamps = clock.stamps[1:]  # the first put() is the prompt
    return _decode_rate([token_stamps[0]], [token_stamps[-1]], len(token_stamps))


def run(
    presets: Sequence[str], batches: Sequence[int], new_tokens: int, repeats: int, threads: int, pin_cpus: bool
) -> list[dict]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="apex-bench-", dir="/tmp") as tmp:
        for preset in presets:
            spec = PRESETS[preset]
            model_dir = write_random_llama(Path(tmp) / spec.name, spec)
            engine = LocalEngine(GpuWorkerConfig(model_dir=str(model_dir), num_threads=threads))
            prompt_ids = _prompt_ids(model_dir)
            hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            hf = statistics.median(bench_transformers(hf_model, prompt_ids, new_tokens) for _ in range(repeats))
            del hf_model
            config = StackConfig(  # the in-process engine's policy: the two paths differ only by the services
                model_dir=str(model_dir), port=rpc.free_tcp_port(), http_port=0, run_dir=f"{tmp}/run",
                worker_threads=threads, pin_cpus=pin_cpus, metrics_port=0, policy="gpu-only",
            )
            unplanned = replace(config, port=rpc.free_tcp_port(), run_dir=f"{tmp}/run-sync", async_scheduling=False)
            device_cpus, host_cpus = split_cores(threads) if pin_cpus else (None, None)
            with ExitStack() as stacks:
                addresses = [stacks.enter_context(Stack(c)).config.gateway_address for c in (config, unplanned)]
                for batch in batches:
                    runs: list[list[float]] = [[], [], []]  # in-process, stack, stack without async scheduling
                    with pinned(host_cpus):
                        for address in addresses:
                            asyncio.run(bench_stack(address, batch, new_tokens))  # warm-up
                    for _ in range(repeats):  # interleaved, so drift on a shared machine hits all alike
                        with pinned(device_cpus):
                            runs[0].append(bench_in_process(engine, prompt_ids, batch, new_tokens))
                        with pinned(host_cpus):
                            for arm, address in enumerate(addresses, 1):
                                runs[arm].append(asyncio.run(bench_stack(address, batch, new_tokens)))
                    local, served, served_sync = (statistics.median(r) for r in runs)
                    rows.append(dict(
                        model=spec.name, batch=batch, threads=threads, new_tokens=new_tokens,
                        stack_tok_s=served, stack_sync_tok_s=served_sync, in_process_tok_s=local,
                        transformers_tok_s=hf if batch == 1 else None,
                        stack_over_in_process=served / local, stack_sync_over_in_process=served_sync / local,
                        in_process_over_transformers=local / hf if batch == 1 else None,
                    ))
    return rows


def _prompt_ids(model_dir: Path) -> list[int]:
    from gateway.tokenizer import load_tokenizer

    return load_tokenizer(model_dir).encode(PROMPT).ids


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(rows: list[dict]) -> str:
    head = (f"{'model':<18}{'batch':>6}{'stack tok/s':>13}{'sync tok/s':>12}{'in-proc tok/s':>15}{'HF tok/s':>10}"
            f"{'stack/in-proc':>15}{'sync/in-proc':>14}{'in-proc/HF':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<18}{r['batch']:>6}{_fmt(r['stack_tok_s']):>13}{_fmt(r['stack_sync_tok_s']):>12}"
            f"{_fmt(r['in_process_tok_s']):>15}{_fmt(r['transformers_tok_s']):>10}"
            f"{_fmt(r['stack_over_in_process']):>15}{_fmt(r['stack_sync_over_in_process']):>14}"
            f"{_fmt(r['in_process_over_transformers']):>12}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve bench", description=__doc__)
    parser.add_argument("--presets", default="default,bench")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pin-cpus", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="bench_results/stack_overhead.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = run(args.presets.split(","), batches, args.new_tokens, args.repeats, args.threads, args.pin_cpus)
    logger.info("decode throughput (median of %d; torch threads %d)\n%s", args.repeats, args.threads, report(rows))
    write_result(args.out, rows)
    return 0
