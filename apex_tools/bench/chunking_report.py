"""The chunked prefill benchmark's outputs: a markdown table (the load, the decodes' TPOT and inter-token gaps and the
long prompts' TTFT per budget, the iteration timeline of the first long arrival) and a PNG (the decodes' inter-token
gaps over time with the long prompts' arrivals, and the timeline's step times)."""

from pathlib import Path

from apex_tools.bench.common import save_figure

RUN_LABELS = {"chunked": "chunked", "whole": "whole prompts"}


def _num(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _load_line(result: dict) -> str:
    load = result["load"]
    return (f"Load: {load['decodes']} decodes ({load['decode_prompt_len']}-token prompts, {load['decode_output_len']} "
            f"output tokens, greedy) running while {load['long_prompts']} prompts of {load['long_prompt_len']} tokens "
            f"({load['long_output_len']} output tokens) arrive after {load['arrivals_after_decode_tokens']} tokens of "
            f"the first decode stream. Model {result['model']}, policy {result['policy']}, device KV pool "
            f"{load['device_kv_blocks']} blocks of {load['block_size']} (holds the whole load), gpu_worker on core "
            f"{load['device_cpu']} with {load['torch_threads']} torch thread, scheduler and client on core "
            f"{load['host_cpu']}.")


def _mode(name: str | None) -> str:
    """EXECUTION_MODE_ASYNC_OVERLAP -> async_overlap."""
    return "-" if not name else name.removeprefix("EXECUTION_MODE_").lower()


def _timeline_table(name: str, run: dict) -> list[str]:
    t = run["timeline"]
    lines = [f"### {RUN_LABELS[name]} (--max-num-batched-tokens {run['budget']}): steps {t['first_step']}.."
             f"{t['last_step']}" + ("" if t["complete"] else " (some steps were not read)"), "",
             "| step | mode | prefills | prefill tokens | decode rows | measured ms | predicted ms |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for s in t["steps"]:
        lines.append(f"| {s['step_id']} | {_mode(s['mode'])} | {s['num_prefills']} | {s['prefill_tokens']} | "
                     f"{s['decode_rows']} | {s['measured_ms']:.1f} | {_num(s['predicted_ms'] or None, '.1f')} |")
    return lines + [""]


def markdown(result: dict) -> str:
    lines = ["# Chunked prefill: running decodes while long prompts arrive", "", _load_line(result), "",
             ("| budget (tokens/step) | decode TPOT p50 ms | p99 | inter-token gap p50 ms | p99 | max | "
              "long-prompt TTFT p50 ms | max | lengths ok |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, run in result["runs"].items():
        m = result["medians"][name]
        lines.append(f"| {RUN_LABELS[name]}: {run['budget']} | {m['tpot_p50_ms']:.1f} | {m['tpot_p99_ms']:.1f} | "
                     f"{m['gap_p50_ms']:.1f} | {m['gap_p99_ms']:.1f} | {m['gap_max_ms']:.1f} | "
                     f"{m['ttft_p50_ms']:.0f} | {m['ttft_max_ms']:.0f} | {result['lengths_ok'][name]} |")
    lines += ["", f"Medians of {result['repeats']} runs per budget, the budgets alternating in order.",
              "", "Chunked over whole prompts: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()),
              "", "## Iteration timeline of the first long arrival (submission to first token), first run", ""]
    for name, run in result["runs"].items():
        lines += _timeline_table(name, run)
    return "\n".join(lines).rstrip()


def plot(result: dict, path: Path) -> Path:
    """Top: every decode inter-token gap against the time it ended, per budget, with the long prompts' arrivals.
    Bottom: the measured time of each step of the first long arrival's timeline, per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (gaps_ax, steps_ax) = plt.subplots(2, 1, figsize=(9, 7))
    for (name, run), color in zip(result["runs"].items(), ("tab:blue", "tab:orange"), strict=False):
        label = f"{RUN_LABELS[name]} ({run['budget']} tokens/step)"
        gaps = run["decodes"]["gaps"]
        gaps_ax.scatter([t for t, _ in gaps], [g for _, g in gaps], s=4, color=color, label=label)
        for arrival in run["long_prompts"]["arrivals_s"]:
            gaps_ax.axvline(arrival, color=color, linestyle=":", linewidth=1)
        steps = run["timeline"]["steps"]
        offset = 0.2 if name == "whole" else -0.2
        steps_ax.bar([i + offset for i in range(len(steps))], [s["measured_ms"] for s in steps], 0.4, color=color,
                     label=label)
        for i, s in enumerate(steps):
            steps_ax.annotate(f"{s['prefill_tokens']}p+{s['decode_rows']}d", (i + offset, s["measured_ms"]), ha="center",
                              va="bottom", fontsize=7)
    gaps_ax.set_xlabel("time since the decodes were submitted (s); dotted: a long prompt arrives")
    gaps_ax.set_ylabel("decode inter-token gap (ms)")
    gaps_ax.set_yscale("log")
    gaps_ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    gaps_ax.yaxis.set_major_formatter(ticker.ScalarFormatter())  # plain numbers: no mathtext, no font look-ups
    gaps_ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    load = result["load"]
    gaps_ax.set_title(f"{result['model']}, {result['policy']}: {load['decodes']} running decodes, "
                      f"{load['long_prompts']} prompts of {load['long_prompt_len']} tokens arrive", fontsize=9)
    gaps_ax.legend(fontsize=8)
    steps_ax.set_xlabel("step of the first long prompt's wait for a first token "
                        "(label: prefill tokens p, or prefills r; + decode rows d)")
    steps_ax.set_ylabel("measured step time (ms)")
    steps_ax.legend(fontsize=8)
    for ax in (gaps_ax, steps_ax):
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)
