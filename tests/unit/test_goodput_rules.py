"""bench-goodput's rules on made-up rows: goodput and whether it is only a lower bound, the loads swept past the
listed ones while a policy still sustains the highest, and apex's p99 TPOT against gpu-only's two runs, judged where
apex ran CPU rows."""

from apex_tools.bench import goodput_report as rep
from apex_tools.bench.goodput import Flags, sweep


def row(rate: float, met: bool, tpot_p99_ms: float = 10.0, cpu_rows: int = 0, again_ms: float | None = None) -> dict:
    r = {"rate_per_s": rate, "load_tokens_per_s": 40 * rate, "met": met, "tpot_p99_ms": tpot_p99_ms,
         "iterations_by_mode": {"gpu_only": 100, **({"async_overlap": cpu_rows} if cpu_rows else {})}}
    if again_ms is not None:
        r["again"] = {"tpot_p99_ms": again_ms, "met": True}
    return r


def test_goodput_is_the_highest_rate_met_and_a_lower_bound_when_no_higher_rate_ran() -> None:
    assert rep.goodput([row(1, True), row(2, True), row(4, False)]) == {
        "rate_per_s": 2, "load_tokens_per_s": 80, "lower_bound": False}
    assert rep.goodput([row(1, True), row(2, True)])["lower_bound"]
    assert rep.goodput([row(1, False), {"rate_per_s": 2, "skipped": "not run"}]) is None


def test_the_sweep_doubles_the_load_while_some_policy_met_the_last_at_most_extend_times() -> None:
    flags = Flags(("gpu-only", "apex"), (30.0, 60.0), 0, 0, 3.0, False, extend=3)
    rows: dict[str, list[dict]] = {"gpu-only": [], "apex": []}
    met_by_load = {30.0: (True, True), 60.0: (False, True), 120.0: (False, True), 240.0: (False, False)}
    swept = []
    for load in sweep(flags, rows):
        swept.append(load)
        for policy, met in zip(rows, met_by_load[load], strict=True):
            rows[policy].append(row(load / 40, met))
    assert swept == [30.0, 60.0, 120.0, 240.0]  # 480 not run: nobody met 240

    rows = {"gpu-only": [row(1, True)], "apex": [row(1, True)]}
    assert list(sweep(Flags(("gpu-only",), (40.0,), 0, 0, 3.0, False, extend=0), rows)) == [40.0]


def test_apex_p99_tpot_is_held_to_the_higher_of_gpu_onlys_two_runs_where_it_ran_cpu_rows() -> None:
    policies = {
        "gpu-only": {"rates": [row(1, True, 8.0, again_ms=9.0), row(2, True, 10.0, again_ms=9.5),
                               row(4, True, 12.0, again_ms=11.0), row(8, False, 30.0)]},
        "apex": {"rates": [row(1, True, 9.5), row(2, True, 9.9, cpu_rows=5), row(4, True, 12.5, cpu_rows=40),
                           row(8, True, 13.0, cpu_rows=90)]},
    }
    compared = rep.tpot_p99_vs_gpu_only(policies)
    assert [(c["rate_per_s"], c["judged"], c["apex_at_or_under"]) for c in compared] == [
        (1, False, False),  # 9.5 over 8.0 and 9.0, but no CPU row: gpu-only's plans, not judged
        (2, True, True),  # 9.9 under 10.0
        (4, True, False),  # 12.5 over 12.0 and 11.0
    ]
    policies["neo"] = {"rates": [row(1, True), row(2, False)]}
    for p in policies.values():
        p["goodput"] = rep.goodput(p["rates"])
    workload = {"policies": policies, "tpot_p99": compared, "ratios": rep.ratios(policies)}
    targets = rep.targets({"decode-heavy": workload, "long-output": workload})
    assert workload["ratios"] == {"apex_goodput_over_gpu_only": 2.0, "apex_goodput_over_neo": 8.0}
    assert targets["decode_heavy_apex_p99_tpot_at_or_under_gpu_only"] is False  # the rate of 4 req/s
    # apex's goodput (8) is a lower bound, gpu-only's (4) and neo's (1) are not: those targets are met
    assert targets["decode_heavy_apex_goodput_1_5x_gpu_only"] and targets["decode_heavy_apex_goodput_1_1x_neo"]


def test_a_ratio_over_a_baseline_whose_goodput_is_only_a_lower_bound_does_not_meet_the_target() -> None:
    gpu_only, apex = [row(1, True), row(2, False)], [row(1, True), row(2, True), row(4, False)]
    neo = [row(1, True), {"rate_per_s": 2, "load_tokens_per_s": 80, "error": "RpcError: the run failed"}]
    policies = {p: {"rates": r, "goodput": rep.goodput(r)} for p, r in
                (("gpu-only", gpu_only), ("neo", neo), ("apex", apex))}
    workload = {"policies": policies, "tpot_p99": [], "ratios": rep.ratios(policies)}
    targets = rep.targets({"decode-heavy": workload, "long-output": workload})
    assert workload["ratios"] == {"apex_goodput_over_gpu_only": 2.0, "apex_goodput_over_neo": 2.0}
    assert policies["neo"]["goodput"]["lower_bound"]  # its run at 2 req/s failed: neo's goodput may be 2 or more
    assert not targets["long_output_apex_goodput_1_1x_neo"] and targets["long_output_apex_goodput_1_5x_gpu_only"]
