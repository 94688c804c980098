"""The soak benchmark's verdict and report (apex_tools.bench.soak): resident-memory growth per service over its current
process, whether the run passed, and the table printed from the result."""

from collections.abc import Callable


def rss_growth(samples: list[dict], warmup_s: float) -> dict:
    """Growth of resident memory (VmRSS) over the service's current process, in %: from its first sample after
    warm-up to its last; also of its private part (VmRSS less RssShmem: the shared KV pool's pages count in VmRSS as
    they are first touched, which is no leak). Warm-up: the first warmup_s of the load; for a process that replaced a
    killed one, the first warmup_s after its first sample."""
    pids = list(dict.fromkeys(s["pid"] for s in samples))
    latest = [s for s in samples if pids and s["pid"] == pids[-1]]
    start_s = warmup_s + (latest[0]["t_s"] if len(pids) > 1 else 0.0)
    current = [s for s in latest if s["t_s"] >= start_s]

    def growth(kib: Callable[[dict], int]) -> float | None:
        return 100.0 * (kib(current[-1]) - kib(current[0])) / kib(current[0]) if len(current) >= 2 else None

    note = ""
    if len(pids) > 1:
        note = f"restarted {len(pids) - 1} time(s): the series starts again with each process; " + (
            f"growth of the latest (pid {pids[-1]}) from {current[0]['t_s']:.0f} s" if len(current) >= 2
            else "too few samples of the latest process after its warm-up")
    return {"growth_pct": growth(lambda s: s["rss_kib"]),
            "private_growth_pct": growth(lambda s: s["rss_kib"] - s["shmem_kib"]),
            "restarts": len(pids) - 1, "note": note,
            "first_kib": current[0]["rss_kib"] if current else None,
            "last_kib": current[-1]["rss_kib"] if current else None, "samples": samples}


def passed(result: dict) -> bool:
    """Nothing lost, every kill recovered, both pools free again."""
    return (result["requests"]["lost"] == 0 and result["num_recoveries"] == result["num_kills"]
            and result["end"]["back_to_total"])


def report(result: dict) -> str:
    def num(value: float | None, spec: str = ".1f") -> str:
        return "-" if value is None else format(value, spec)

    r, lat, load, cap, b = result["requests"], result["latency"], result["load"], result["capacity"], result["end"]
    lines = [
        (f"capacity {cap['requests_per_s']:.2f} req/s ({cap['tokens_per_s']:.0f} tok/s, {cap['concurrency']} clients); "
         f"load {load['load_fraction']:.2f} x = {load['offered_requests_per_s']:.2f} req/s offered, "
         f"{load['achieved_requests_per_s']:.2f} completed/s, mean running {num(load['mean_running'])} "
         f"({num(load['mean_running_cpu'])} on the CPU pool, at most {num(load['max_running_cpu'], 'd')})"),
        f"{'sent':>8}{'completed':>11}{'cancelled':>11}{'failed':>8}{'lost':>6}",
        f"{r['sent']:>8}{r['completed']:>11}{r['cancelled']:>11}{r['failed']:>8}{r['lost']:>6}",
    ]
    if r["failed_by_error"] or r["lost_by_reason"]:
        lines.append(f"failed: {r['failed_by_error']}  lost: {r['lost_by_reason']}")
    lines += [
        (f"TTFT p50/p99 {num(lat['ttft_p50_ms'])}/{num(lat['ttft_p99_ms'])} ms, TPOT p50/p99 "
         f"{num(lat['tpot_p50_ms'])}/{num(lat['tpot_p99_ms'])} ms over {lat['requests']} completed requests"),
        f"cpu_attention_worker kills {result['num_kills']}, recoveries {result['num_recoveries']}"
        + "".join(f"; at {k['at_s']:.0f} s with {k['running_cpu_at_kill']} requests on the CPU pool, back after "
                  f"{num(k['recovery_s'], '.2f')} s" for k in result["kills"]),
        f"{'service':<22}{'RSS first MiB':>14}{'last MiB':>10}{'growth %':>10}{'private %':>11}  note",
    ]
    for module, rss in result["rss"].items():
        first = None if rss["first_kib"] is None else rss["first_kib"] / 1024
        last = None if rss["last_kib"] is None else rss["last_kib"] / 1024
        lines.append(f"{module:<22}{num(first):>14}{num(last):>10}{num(rss['growth_pct']):>10}"
                     f"{num(rss['private_growth_pct']):>11}  {rss['note']}")
    lines.append(f"blocks free/total at the end: accelerator {b['free']}/{b['total']}, CPU {b['free_cpu']}/"
                 f"{b['total_cpu']} ({'back to total' if b['back_to_total'] else 'NOT back to total'})")
    return "\n".join(lines)
