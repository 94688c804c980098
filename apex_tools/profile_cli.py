"""`apex-serve profile`: runs (or reuses) the profile of a running stack with a progress bar, prints a summary of
every table (its times, the ranges it measured and where serving extrapolates past them), and plots each table with
its measured points (PNG)."""

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from tqdm import tqdm

from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from apex_tools.bench.common import save_figure
from scheduler_service.cost.tables import describe_ranges

logger = logging.getLogger(__name__)

TITLES = {
    "t_lin": ("tokens in the iteration", "linear layers (norms, QKV, O, MLP)"),
    "t_pref": ("prefill chunk tokens of one request", "prefill attention over the chunk and its context, KV write"),
    "t_gatt": ("KV tokens over the rows", "accelerator decode attention, by decode rows"),
    "t_catt": ("KV tokens over the rows", "CPU decode attention, by decode rows"),
    "t_xfer": ("bytes staged per layer", "staging of the CPU rows (q/k/v out, o back)"),
    "t_sync": ("", "doorbell round trip"),
    "t_step": ("requests in the iteration",
               "per iteration: embedding, lm head, sampling, code between subtasks (ns per iteration)"),
}


def run_profile(address: str, quick: bool, force: bool) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = profiler_pb2_grpc.ProfilerStub(channel)
        bar: tqdm | None = None
        for progress in stub.Profile(profiler_pb2.ProfileRequest(quick=quick, force=force)):
            if progress.stage == "reused":
                logger.info("profile %s reused from %s (use --force to measure again)", progress.key_hash,
                            progress.path)
                return
            if bar is None:
                bar = tqdm(total=progress.total, unit="point", desc="profiling")
            bar.set_postfix_str(progress.stage)
            bar.update(progress.done - bar.n)
            if progress.stage == "done":
                bar.close()
                logger.info("profile %s stored at %s", progress.key_hash, progress.path)


def summary(profile: dict) -> str:
    lines = [f"{'table':<8}{'points':>7}  {'min ns/layer':>13}  {'max ns/layer':>13}  what"]
    for name, table in profile["tables"].items():
        values = [v for row in table["zs"] for v in row] if "zs" in table else table["ys"]
        lines.append(f"{name:<8}{len(values):>7}  {min(values):>13,.0f}  {max(values):>13,.0f}  {TITLES[name][1]}")
    return "\n".join(lines + describe_ranges(profile.get("ranges", {})))


def plot(profile: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in profile["tables"].items():
        xlabel, title = TITLES[name]
        fig, ax = plt.subplots(figsize=(6, 4))
        if name == "t_pref":  # one line per context before the chunk, over the chunk's tokens
            for j, context in enumerate(table["ys"]):
                ax.plot(table["xs"], [zs[j] / 1e3 for zs in table["zs"]], marker="o", label=f"context {context}")
            ax.legend()
        elif "zs" in table:
            for rows, zs in zip(table["xs"], table["zs"]):
                ax.plot(table["ys"], [z / 1e3 for z in zs], marker="o", label=f"{rows} rows")
            ax.legend()
        else:
            ax.plot(table["xs"], [y / 1e3 for y in table["ys"]], marker="o")
        if len(table["xs"]) > 1 or "zs" in table:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())  # plain numbers: no mathtext, no font look-ups
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("µs per layer" if name != "t_step" else "µs per iteration")
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.grid(True, alpha=0.3)
        written.append(save_figure(fig, out_dir / f"{name}.png"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve profile", description=__doc__)
    parser.add_argument("--address", default="unix:.apex-run/profiler.sock", help="the profiler of a running stack")
    parser.add_argument("--quick", action="store_true", help="a coarse grid (under 2 minutes on the default model)")
    parser.add_argument("--force", action="store_true", help="measure even if a profile of this key is stored")
    parser.add_argument("--plots", default="bench_results/profile", help="folder for one PNG per table")
    args = parser.parse_args(argv)
    try:
        run_profile(args.address, args.quick, args.force)
        with grpc.insecure_channel(args.address) as channel:
            stub = profiler_pb2_grpc.ProfilerStub(channel)
            model = stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
    except grpc.RpcError as exc:
        logger.error("profile failed: %s: %s", exc.code().name, exc.details())
        return 1
    profile = json.loads(model.tables_json)
    logger.info("performance tables (key %s)\n%s", model.key_hash, summary(profile))
    for path in plot(profile, Path(args.plots)):
        logger.info("wrote %s", path)
    return 0
