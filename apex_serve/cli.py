"""`apex-serve`: up (the whole stack), make-model, generate, bench."""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from apex_serve.flags import add_config_flags, config_from_args
from apex_serve.launcher import StackConfig
from apex_serve.logs import configure_logging

logger = logging.getLogger(__name__)


def _cmd_up(args: argparse.Namespace) -> int:
    from apex_serve.default_model import DEFAULT_SPEC, write_random_llama
    from apex_serve.launcher import run_until_signal

    config = config_from_args(StackConfig, args)
    if not Path(config.model_dir).exists():
        if config.model_dir != StackConfig.model_dir:
            logger.error("model_dir: %s does not exist", config.model_dir)
            return 2
        logger.info("writing the default model to %s", config.model_dir)
        write_random_llama(config.model_dir, DEFAULT_SPEC)
    return run_until_signal(config)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from apex_serve.default_model import BENCH_SPEC, DEFAULT_SPEC, write_random_llama

    spec = {"default": DEFAULT_SPEC, "bench": BENCH_SPEC}[args.preset]
    out = write_random_llama(args.out or f"models/{spec.name}", spec, seed=args.seed)
    logger.info("wrote %s (%s) to %s", spec.name, args.preset, out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from apex_serve.client import Completion, GatewayClient, TextChunk
    from apex_serve.types import SamplingParams

    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, max_tokens=args.max_tokens
    )
    with GatewayClient(args.address) as client:
        try:
            for event in client.generate(args.prompt, sampling, model=args.model):
                if isinstance(event, TextChunk):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, Completion):
                    sys.stdout.write("\n")
                    logger.info(
                        "finish_reason=%s prompt_tokens=%d completion_tokens=%d",
                        event.finish_reason.value if event.finish_reason else "none",
                        event.prompt_tokens, event.completion_tokens,
                    )
        except grpc.RpcError as err:
            logger.error("%s: %s", err.code().name, err.details())
            return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from apex_serve.bench.skeleton import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack as local processes")
    add_config_flags(up, StackConfig)
    up.set_defaults(func=_cmd_up)

    make = sub.add_parser("make-model", help="write a random-weight LLaMA with a byte-level tokenizer")
    make.add_argument("--preset", choices=["default", "bench"], default="default")
    make.add_argument("--out", default="", help="default: models/<name>")
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=_cmd_make_model)

    gen = sub.add_parser("generate", help="stream a completion from a running stack")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="the skeleton benchmark (see `apex-serve bench -- --help`)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("apex-serve")
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))
