"""`apex-serve`: up (the whole stack), make-model, generate, chat, trace-collect, trace-report, bench-*
(benchmarks)."""

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from apex_serve.flags import add_config_flags, config_from_args
from apex_serve.logs import configure_logging
from apex_serve.sdk import ApexServeError, ChatMessage, Chunk, Client, Completion
from apex_tools.launcher import StackConfig

logger = logging.getLogger(__name__)


def _cmd_up(args: argparse.Namespace) -> int:
    from apex_tools.default_model import DEFAULT_SPEC, write_random_llama
    from apex_tools.launcher import run_until_signal

    config = config_from_args(StackConfig, args)
    if not Path(config.model_dir).exists():
        if config.model_dir != StackConfig.model_dir:
            logger.error("model_dir: %s does not exist", config.model_dir)
            return 2
        logger.info("writing the default model to %s", config.model_dir)
        write_random_llama(config.model_dir, DEFAULT_SPEC)
    return run_until_signal(config)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from apex_tools.default_model import BENCH_SPEC, DEFAULT_SPEC, write_random_llama

    spec = {"default": DEFAULT_SPEC, "bench": BENCH_SPEC}[args.preset]
    out = write_random_llama(args.out or f"models/{spec.name}", spec, seed=args.seed)
    logger.info("wrote %s (%s) to %s", spec.name, args.preset, out)
    return 0


def _sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, logprobs=args.logprobs,
    )
    return {k: v for k, v in fields.items() if v is not None}


def _print_stream(events: Iterable[Chunk | Completion], show_logprobs: bool) -> Completion:
    completion = None
    for event in events:
        if isinstance(event, Chunk):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            if show_logprobs:
                for lp in event.logprobs:
                    logger.info("token %d logprob %.4f top %s", lp.token_id, lp.logprob, lp.top)
        else:
            completion = event
    sys.stdout.write("\n")
    assert completion is not None, "the stream ended without a completion"
    logger.info(
        "finish_reason=%s prompt_tokens=%d completion_tokens=%d",
        completion.finish_reason.value if completion.finish_reason else "none",
        completion.prompt_tokens, completion.completion_tokens,
    )
    return completion


def _cmd_generate(args: argparse.Namespace) -> int:
    with Client(args.address, api_key=args.api_key) as client:
        try:
            events = client.stream(args.prompt, model=args.model, stop=args.stop, **_sampling_fields(args))
            _print_stream(events, args.logprobs is not None)
        except ApexServeError as err:
            logger.error("%s", err)
            return 1
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    """A conversation on the terminal: each line you type is a user turn; Ctrl-D ends it."""
    history = [ChatMessage("system", args.system)] if args.system else []
    with Client(args.address, api_key=args.api_key) as client:
        for line in sys.stdin:
            if not line.strip():
                continue
            history.append(ChatMessage("user", line.rstrip("\n")))
            try:
                events = list(client.stream(history, model=args.model, stop=args.stop, **_sampling_fields(args)))
            except ApexServeError as err:
                logger.error("%s", err)
                return 1
            _print_stream(events, False)
            history.append(ChatMessage("assistant", "".join(e.text for e in events if isinstance(e, Chunk))))
    return 0


def _cmd_delegated(args: argparse.Namespace) -> int:
    """Verbs with their own argument parser (benchmarks, profile)."""
    from apex_tools import otlp_receiver, profile_cli
    from apex_tools.bench import (
        chaos,
        chunking,
        cost_model_accuracy,
        gateway,
        goodput,
        hybrid,
        kernel,
        policies,
        scheduler_overhead,
        soak,
        stack_overhead,
        structured,
        tracing,
    )
    from apex_tools.sim import cli as simulate
    from apex_tools.trace_report import cli as trace_report

    mains = {"bench": stack_overhead.main, "bench-gateway": gateway.main, "bench-kernel": kernel.main,
             "bench-hybrid": hybrid.main, "bench-cost-model": cost_model_accuracy.main, "profile": profile_cli.main,
             "bench-scheduler": scheduler_overhead.main, "bench-policies": policies.main,
             "bench-goodput": goodput.main, "simulate": simulate.main,
             "bench-tracing": tracing.main, "trace-collect": otlp_receiver.main, "trace-report": trace_report.main,
             "bench-chaos": chaos.main, "bench-soak": soak.main, "bench-chunking": chunking.main,
             "bench-structured": structured.main}
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest  # `apex-serve bench -- --flag` passes --flag on
    return mains[args.command](rest)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default="")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--logprobs", type=int, default=None, help="show the sampled token's and the top-N logprobs")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack as local processes", allow_abbrev=False)
    add_config_flags(up, StackConfig)
    up.set_defaults(func=_cmd_up)

    make = sub.add_parser("make-model", help="write a random-weight LLaMA with a byte-level tokenizer")
    make.add_argument("--preset", choices=["default", "bench"], default="default")
    make.add_argument("--out", default="", help="default: models/<name>")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=_cmd_make_model)

    gen = sub.add_parser("generate", help="stream a completion from a running stack")
    gen.add_argument("prompt")
    _add_client_flags(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="chat on the terminal with a running stack (the model's chat template)")
    chat.add_argument("--system", default="", help="a system message to start the conversation with")
    _add_client_flags(chat)
    chat.set_defaults(func=_cmd_chat)

    profile = sub.add_parser("profile", help="profile a running stack: progress, summary, plots "
                             "(see `apex-serve profile -- --help`)")
    profile.add_argument("rest", nargs=argparse.REMAINDER)
    profile.set_defaults(func=_cmd_delegated)
    for name, about in (
        ("bench", "decode tokens/s: the stack against the engine in-process and transformers"),
        ("bench-gateway", "inter-token latency the gateway adds over talking to the scheduler"),
        ("bench-kernel", "the CPU attention kernel's KV read rate against this machine's read bandwidth"),
        ("bench-hybrid", "doorbell against gRPC round trips; tokens/s and hidden CPU time of the three modes"),
        ("bench-cost-model", "predicted against measured iteration time per mode, before and after online correction"),
        ("bench-scheduler", "the scheduler's decision overhead per iteration with 256 running requests, per policy"),
        ("bench-policies", "gpu-only, neo and apex side by side on this machine: tokens/s and TPOT"),
        ("bench-goodput", "gpu-only, neo and apex under Poisson arrivals: latency against rate, and goodput"),
        ("simulate", "the policies on T4/A10 (or this machine's profile) with the analytic cost model, at scale"),
        ("bench-tracing", "decode tokens/s with tracing on against off, and the overlap report of the traced run"),
        ("bench-chaos", "SIGKILL of the gpu_worker, the scheduler or the cpu_attention_worker mid-stream: recovery times"),
        ("bench-chunking", "TPOT of running decodes while long prompts arrive: chunked prefill against whole prompts"),
        ("bench-structured", "json_schema and guided_choice replies that validate, on either pool; the mask's cost"),
        ("bench-soak", "open-loop load with cancels and cpu_attention_worker kills: lost requests, latency, RSS growth"),
        ("trace-collect", "an OTLP/gRPC receiver that writes the spans it gets to an OTLP JSON file"),
        ("trace-report", "a trace (OTLP JSON or Jaeger) to an overlap timeline (PNG, HTML), a Chrome trace, a summary"),
    ):
        bench = sub.add_parser(name, help=f"{about} (see `apex-serve {name} -- --help`)")
        bench.add_argument("rest", nargs=argparse.REMAINDER)
        bench.set_defaults(func=_cmd_delegated)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("apex-serve")
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))
