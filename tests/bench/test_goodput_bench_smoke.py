"""The goodput benchmark (`apex-serve bench-goodput`) at its tiniest: one workload, gpu-only and apex, two rates, a
few requests each. The objectives follow the stated rule from gpu-only's row at the lowest rate, each rate's
met-fraction is the share of its requests within both, goodput is the highest rate met, gpu-only runs again at each
rate it sustained and apex's p99 TPOT is held against the higher of its two runs, and the JSON, table and figure are
written."""

import json
from pathlib import Path

import pytest

from apex_tools.bench import goodput_report as rep
from apex_tools.bench.goodput import main

LOADS = (40.0, 400.0)


def test_goodput_bench_tiny_applies_the_objectives_and_the_goodput_rule(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"

    code = main(["--tiny", "--workloads", "decode-heavy", "--policies", "gpu-only,apex", "--requests", "3",
                 "--loads", ",".join(map(str, LOADS)), "--full-sweep", "--extend", "0", "--out", str(out)])

    result = json.loads(out.read_text())
    assert code == 0, json.dumps(result["workloads"], indent=1)[:3000]
    assert list(result["workloads"]) == ["decode-heavy"]
    w = result["workloads"]["decode-heavy"]
    assert list(w["policies"]) == ["gpu-only", "apex"]
    lowest = w["policies"]["gpu-only"]["rates"][0]
    assert w["objectives"] == {"ttft_ms": pytest.approx(rep.TTFT_FACTOR * lowest["ttft_p50_ms"]),
                               "tpot_ms": pytest.approx(rep.TPOT_FACTOR * lowest["tpot_p50_ms"])}
    for policy, p in w["policies"].items():
        rows = p["rates"]
        assert [r["load_tokens_per_s"] for r in rows] == list(LOADS), policy
        assert rows[0]["rate_per_s"] < rows[1]["rate_per_s"], policy
        for r in rows:
            assert r["received_tokens"] == r["expected_tokens"], (policy, r["rate_per_s"])
            assert r["tokens_per_s"] > 0 and r["tpot_p50_ms"] <= r["tpot_p99_ms"], (policy, r["rate_per_s"])
            within = [q["ttft_ms"] <= w["objectives"]["ttft_ms"]
                      and (q["tpot_ms"] is None or q["tpot_ms"] <= w["objectives"]["tpot_ms"]) for q in r["requests"]]
            assert r["met_fraction"] == pytest.approx(sum(within) / len(within)), (policy, r["rate_per_s"])
            assert r["met"] == (r["met_fraction"] >= rep.MET_FRACTION), (policy, r["rate_per_s"])
        met = [r["rate_per_s"] for r in rows if r["met"]]
        assert (p["goodput"] or {}).get("rate_per_s") == (max(met) if met else None), policy
    assert "apex_goodput_over_gpu_only" in w["ratios"]
    gpu_only = w["policies"]["gpu-only"]["rates"]
    for r in gpu_only:  # gpu-only runs again, last, at every rate it sustained
        assert ("again" in r) == r["met"], r["rate_per_s"]
    compared = {c["rate_per_s"]: c for c in w["tpot_p99"]}
    assert sorted(compared) == [r["rate_per_s"] for r in gpu_only if r["met"]]
    apex = {r["rate_per_s"]: r for r in w["policies"]["apex"]["rates"]}
    for r in gpu_only:
        if r["met"]:
            c = compared[r["rate_per_s"]]
            assert c["gpu_only_again_ms"] == r["again"]["tpot_p99_ms"]
            assert c["apex_at_or_under"] == (apex[r["rate_per_s"]]["tpot_p99_ms"]
                                             <= max(r["tpot_p99_ms"], r["again"]["tpot_p99_ms"]))
            assert c["judged"] == (c["apex_cpu_row_iterations"] > 0)
    assert out.with_suffix(".txt").read_text().startswith(rep.rule(rep.TTFT_FACTOR, rep.TPOT_FACTOR))
    assert (tmp_path / "goodput-decode-heavy.png").stat().st_size > 0
