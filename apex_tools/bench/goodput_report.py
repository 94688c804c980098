"""What bench-goodput makes of its measurements: the latency objectives of a workload, whether a (policy, rate) met
them, goodput, the targets, the text table and the latency-against-rate figure of each workload."""

from pathlib import Path

from apex_tools.bench.common import save_figure
from apex_tools.bench.serving_stack import request_latencies

TTFT_FACTOR = 5.0  # default TTFT objective: this x gpu-only's p50 TTFT at the lowest rate
TPOT_FACTOR = 1.5  # default TPOT objective: this x gpu-only's p50 TPOT at the lowest rate
MET_FRACTION = 0.9  # a rate is sustained when at least this fraction of its requests met both objectives


def rule(ttft_factor: float, tpot_factor: float) -> str:
    return (f"objectives per workload: TTFT <= {ttft_factor:g}x and TPOT <= {tpot_factor:g}x gpu-only's p50 at the "
            f"lowest rate, the same for every policy; a rate is met when >= {MET_FRACTION:.0%} of its requests meet "
            f"both; goodput = the highest rate met")


def objectives(gpu_only_lowest: dict, ttft_factor: float, tpot_factor: float) -> dict[str, float]:
    """The workload's objectives from gpu-only's row at the lowest rate."""
    return {"ttft_ms": ttft_factor * gpu_only_lowest["ttft_p50_ms"],
            "tpot_ms": tpot_factor * gpu_only_lowest["tpot_p50_ms"]}


def met_fraction(results: list[dict], slo: dict[str, float]) -> float:
    """The fraction of requests whose TTFT and TPOT are both within the objectives (a request with no token misses;
    one with a single token has no TPOT to miss)."""
    met = 0
    for result in results:
        ttft, tpot = request_latencies(result)
        met += ttft is not None and ttft <= slo["ttft_ms"] and (tpot is None or tpot <= slo["tpot_ms"])
    return met / len(results)


def goodput(rows: list[dict]) -> dict | None:
    """The highest-rate row of a policy that met the objectives, as {rate_per_s, load_tokens_per_s, lower_bound}
    (lower_bound: no higher rate was run for the policy, so its goodput may be higher); None when none did."""
    met = [r for r in rows if r.get("met")]
    if not met:
        return None
    best = max(met, key=lambda r: r["rate_per_s"])
    ran = [r["rate_per_s"] for r in rows if "met" in r]
    return {"rate_per_s": best["rate_per_s"], "load_tokens_per_s": best["load_tokens_per_s"],
            "lower_bound": best["rate_per_s"] >= max(ran)}


def ratios(policies: dict[str, dict]) -> dict[str, float | None]:
    """apex's goodput over gpu-only's and neo's (None where the other has none or apex did not run)."""
    out: dict[str, float | None] = {}
    apex = policies.get("apex", {}).get("goodput")
    for other in ("gpu-only", "neo"):
        if other not in policies or "apex" not in policies:
            continue
        base = policies[other].get("goodput")
        key = f"apex_goodput_over_{other.replace('-', '_')}"
        out[key] = None if not base else (apex["rate_per_s"] if apex else 0.0) / base["rate_per_s"]
    return out


AGAIN_KEYS = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "met_fraction", "met",
              "error")


def again(row: dict) -> dict:
    """What a second run of gpu-only at a rate keeps of its row: throughput, latency, whether it met the objectives
    (or its error)."""
    return {k: row[k] for k in AGAIN_KEYS if k in row}


def tpot_p99_vs_gpu_only(policies: dict[str, dict]) -> list[dict]:
    """apex's p99 TPOT against gpu-only's at every rate gpu-only met: at or under when at or under the higher of
    gpu-only's two runs there (its row's and its "again"'s; the row's alone where the second run failed), judged where
    apex ran CPU rows (where it ran none it planned as gpu-only does: the two differ by noise alone)."""
    if "gpu-only" not in policies or "apex" not in policies:
        return []
    apex = {r["rate_per_s"]: r for r in policies["apex"]["rates"] if "tpot_p99_ms" in r}
    out = []
    for r in policies["gpu-only"]["rates"]:
        if not r.get("met") or r["rate_per_s"] not in apex:
            continue
        a = apex[r["rate_per_s"]]
        twice = r.get("again", {}).get("tpot_p99_ms")
        bound = r["tpot_p99_ms"] if twice is None else max(r["tpot_p99_ms"], twice)
        hybrid = sum(n for mode, n in a.get("iterations_by_mode", {}).items() if mode != "gpu_only")
        out.append({"rate_per_s": r["rate_per_s"], "gpu_only_ms": r["tpot_p99_ms"], "gpu_only_again_ms": twice,
                    "apex_ms": a["tpot_p99_ms"], "apex_cpu_row_iterations": hybrid, "judged": hybrid > 0,
                    "apex_at_or_under": a["tpot_p99_ms"] <= bound})
    return out


def targets(workloads: dict[str, dict]) -> dict[str, bool] | None:
    """apex goodput >= 1.5x gpu-only's and >= 1.1x neo's (not met where the other's goodput is only a lower bound),
    and p99 TPOT at or under gpu-only's at every rate gpu-only sustains (tpot_p99_vs_gpu_only's rule, where judged),
    on decode-heavy and long-output; None unless both ran with all three policies."""
    wanted = ("decode-heavy", "long-output")
    if any(w not in workloads or {"apex_goodput_over_gpu_only", "apex_goodput_over_neo"} - set(workloads[w]["ratios"])
           for w in wanted):
        return None
    out = {}
    for name in wanted:
        w = workloads[name]
        over_gpu, over_neo = w["ratios"]["apex_goodput_over_gpu_only"], w["ratios"]["apex_goodput_over_neo"]
        key = name.replace("-", "_")
        bounded = {p for p, g in w["policies"].items() if g["goodput"] and g["goodput"]["lower_bound"]}
        out[f"{key}_apex_goodput_1_5x_gpu_only"] = (over_gpu is not None and over_gpu >= 1.5
                                                    and "gpu-only" not in bounded)
        out[f"{key}_apex_goodput_1_1x_neo"] = over_neo is not None and over_neo >= 1.1 and "neo" not in bounded
        out[f"{key}_apex_p99_tpot_at_or_under_gpu_only"] = all(c["apex_at_or_under"] for c in w["tpot_p99"]
                                                               if c["judged"])
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict) -> str:
    header = (f"{'workload':<14}{'policy':<10}{'req/s':>7}{'load':>7}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
              f"{'TPOT p50':>10}{'p99':>8}{'met':>7}  layouts")
    lines = [result["rule"], header]
    for name, w in result["workloads"].items():
        slo = w["objectives"]
        for policy, p in w["policies"].items():
            for r in p["rates"]:
                head = f"{name:<14}{policy:<10}{r['rate_per_s']:>7.2f}{r['load_tokens_per_s']:>7.1f}"
                if "error" in r or "skipped" in r:
                    lines.append(f"{head}  {r.get('error') or r['skipped']}")
                    continue
                lines.append(f"{head}{r['tokens_per_s']:>8.1f}{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>8.0f}"
                             f"{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>8.1f}"
                             f"{r['met_fraction']:>6.0%}{'*' if r['met'] else ' '}  {r['layouts']}")
        if slo:
            lines.append(f"{'':<14}objectives: TTFT <= {slo['ttft_ms']:.0f} ms, TPOT <= {slo['tpot_ms']:.1f} ms")
        lines.append(f"{'':<14}goodput (req/s): " + ", ".join(
            f"{policy} {'>= ' if (p['goodput'] or {}).get('lower_bound') else ''}"
            f"{_fmt((p['goodput'] or {}).get('rate_per_s'), '.2f')}" for policy, p in w["policies"].items()))
        if w["ratios"]:
            lines.append(f"{'':<14}" + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in w["ratios"].items()))
        for c in w["tpot_p99"]:
            lines.append(f"{'':<14}at {c['rate_per_s']:.2f} req/s: apex p99 TPOT {c['apex_ms']:.1f} ms against "
                         f"gpu-only's {c['gpu_only_ms']:.1f} and {_fmt(c['gpu_only_again_ms'], '.1f')} ms (run again, "
                         f"last): {'at or under' if c['apex_at_or_under'] else 'OVER'}"
                         + (f", {c['apex_cpu_row_iterations']} iterations with CPU rows" if c["judged"] else
                            ", no CPU row (gpu-only's plans): not judged"))
    if result["targets"] is not None:
        lines.append("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    lines.append("* = met (the rate is sustained); >= goodput: the highest rate the policy ran; apex's p99 TPOT is "
                 "at or under gpu-only's when at or under the higher of gpu-only's two runs at that rate, judged "
                 "where apex ran CPU rows")
    return "\n".join(lines)


def figure(name: str, workload: dict, path: Path) -> Path:
    """p99 TPOT and p99 TTFT against the request rate, one line per policy (a cross on each rate it did not sustain,
    a hollow marker for gpu-only's second run at a rate), the objectives dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, what in ((axes[0], "tpot", "TPOT"), (axes[1], "ttft", "TTFT")):
        for policy, p in workload["policies"].items():
            rows = [r for r in p["rates"] if f"{key}_p99_ms" in r]
            if rows:
                [line] = ax.plot([r["rate_per_s"] for r in rows], [r[f"{key}_p99_ms"] for r in rows], marker="o",
                                 label=policy)
                missed = [r for r in rows if not r["met"]]
                ax.scatter([r["rate_per_s"] for r in missed], [r[f"{key}_p99_ms"] for r in missed], marker="x", s=90,
                           color=line.get_color(), zorder=3)
                twice = [r for r in rows if f"{key}_p99_ms" in r.get("again", {})]
                if twice:
                    ax.scatter([r["rate_per_s"] for r in twice], [r["again"][f"{key}_p99_ms"] for r in twice],
                               marker="o", facecolors="none", color=line.get_color(), label=f"{policy}, run again")
        if workload["objectives"]:
            ax.axhline(workload["objectives"][f"{key}_ms"], color="grey", linestyle="--", label="objective")
        values = [r[f"{key}_p99_ms"] for p in workload["policies"].values() for r in p["rates"]
                  if f"{key}_p99_ms" in r]
        if values and max(values) > 20 * max(min(values), 1e-9):
            ax.set_yscale("log")
        ax.set_xlabel("arrival rate (requests/s, Poisson)")
        ax.set_ylabel(f"{what} p99 (ms)")
        ax.set_title(f"{name}: {what} p99 against rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
    return save_figure(fig, path)
