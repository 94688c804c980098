"""The simulator's rate sweeps and goodput (apex_tools.sim.goodput), and the CLI's --goodput, --sweep and
--reproduce-paper on tiny grids."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from apex_tools.bench import goodput_report as rep
from apex_tools.sim import paper
from apex_tools.sim.cli import main
from apex_tools.sim.goodput import SweepSpec, at_rate, bracket, met_fraction, rate_sweep
from apex_tools.sim.setups import published_setup
from apex_tools.sim.workloads import WorkloadSpec, generate
from scheduler_service.config import SchedulerConfig


def test_met_fraction_counts_requests_within_both_objectives_and_misses_those_without_a_token() -> None:
    sim = SimpleNamespace(ttft_s=np.array([0.05, 0.2, 0.05, math.nan, 0.01]),
                          tpot_ms=np.array([10.0, 10.0, 30.0, math.nan, math.nan]))
    # met: the first (both within) and the last (one token, no TPOT); missed: TTFT, TPOT, never started
    assert met_fraction(sim, {"ttft_ms": 100.0, "tpot_ms": 20.0}) == pytest.approx(2 / 5)


def test_requests_at_a_rate_keep_their_lengths_and_take_poisson_arrivals_of_the_same_seed() -> None:
    spec = WorkloadSpec("osc", 50, seed=4)
    drawn = generate(spec)
    timed = at_rate(spec, drawn, 3.0)
    assert [(r.prompt_len, r.output_len) for r in timed] == [(r.prompt_len, r.output_len) for r in drawn]
    assert [r.arrival_s for r in timed] == [r.arrival_s for r in generate(WorkloadSpec("osc", 50, 3.0, seed=4))]


def test_a_rate_sweep_sets_the_objectives_from_gpu_only_and_reports_goodput_by_the_benchs_rule() -> None:
    setup = published_setup("t4", "llama2-7b", 4096, 256)
    spec = WorkloadSpec("osc", 30, seed=0)
    sweep = SweepSpec(multiples=(0.5, 2.0), extend=0, refine=0)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096)
    out = rate_sweep(setup, spec, generate(spec), ("apex", "gpu-only"), config, 0.4, sweep, 0.8)
    assert list(out["policies"]) == ["gpu-only", "apex"]
    gpu_lowest = out["policies"]["gpu-only"]["rows"][0]
    assert out["objectives"] == pytest.approx({"ttft_ms": 5.0 * gpu_lowest["ttft_p50_ms"],
                                               "tpot_ms": 1.5 * gpu_lowest["tpot_p50_ms"]})
    for entry in out["policies"].values():
        assert [r["rate_per_s"] for r in entry["rows"]] == pytest.approx([0.2, 0.8])
        assert entry["goodput"] == rep.goodput(entry["rows"])
        assert all(r["met"] == (r["met_fraction"] >= 0.9) for r in entry["rows"])
    apex, gpu = out["policies"]["apex"]["goodput"], out["policies"]["gpu-only"]["goodput"]
    if gpu:
        assert out["ratios"]["gpu-only"] == pytest.approx((apex["rate_per_s"] if apex else 0.0) / gpu["rate_per_s"])


def test_each_policys_goodput_is_bisected_between_its_highest_met_rate_and_the_lowest_it_missed_above() -> None:
    setup = published_setup("t4", "llama2-7b", 4096, 256)
    spec = WorkloadSpec("osc", 30, seed=0)
    grid = (0.25, 1.0, 4.0)
    sweep = SweepSpec(multiples=grid, extend=0, refine=2)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096)
    out = rate_sweep(setup, spec, generate(spec), ("apex", "gpu-only"), config, 0.4, sweep, 0.8)
    bisected = 0
    for entry in out["policies"].values():
        rows = entry["rows"]
        assert [r["multiple"] for r in rows] == sorted(r["multiple"] for r in rows)
        bounds = bracket([r for r in rows if r["multiple"] in grid])
        if bounds is None:
            assert [r["multiple"] for r in rows] == list(grid)
            continue
        bisected += 1
        low, high = bounds
        for _ in range(2):  # each midpoint ran, and moved the bound its outcome says
            mid = math.sqrt(low * high)
            (row,) = [r for r in rows if r["multiple"] == pytest.approx(mid)]
            assert row["rate_per_s"] == pytest.approx(0.4 * mid)
            low, high = (mid, high) if row["met"] else (low, mid)
        assert len(rows) == len(grid) + 2
        assert entry["goodput"] == rep.goodput(rows)
        assert entry["goodput"]["rate_per_s"] == pytest.approx(0.4 * low)
    assert bisected  # the grid left some policy's goodput between two of its rates


def test_bracket_is_the_highest_met_multiple_and_the_lowest_missed_above_it() -> None:
    def rows(*met: tuple[float, bool]) -> list[dict]:
        return [{"multiple": m, "met": ok} for m, ok in met]

    assert bracket(rows((0.5, True), (1.0, False), (2.0, True), (4.0, False), (8.0, False))) == (2.0, 4.0)
    assert bracket(rows((0.5, True), (1.0, True))) is None  # met the highest: a lower bound, nothing above to bisect
    assert bracket(rows((0.5, False), (1.0, False))) is None
    with pytest.raises(ValueError, match="refine"):
        SweepSpec(refine=-1)


def test_cli_goodput_and_a_host_bandwidth_sweep_write_their_results(tmp_path) -> None:
    common = ["--hardware", "t4", "--workload", "osc", "--requests", "12", "--out-dir", str(tmp_path)]
    assert main([*common, "--goodput", "--rate-multiples", "1", "--extend", "0", "--no-plot"]) == 0
    result = json.loads((tmp_path / "simulate.json").read_text())
    assert [g["workload"] for g in result["goodput"]] == ["osc"]
    assert set(result["goodput"][0]["policies"]) == {"gpu-only", "neo", "neo-published", "apex"}
    assert main([*common, "--sweep", "host-bw=20,160", "--policies", "gpu-only,apex"]) == 0
    swept = json.loads((tmp_path / "simulate-sweep-host-bw.json").read_text())
    assert [v["value"] for v in swept["values"]] == [20.0, 160.0]
    slow, fast = ({r["policy"]: r["throughput_tok_s"] for r in v["runs"]} for v in swept["values"])
    assert fast["apex"] > slow["apex"] and fast["gpu-only"] == slow["gpu-only"]  # the host moves apex alone
    assert (tmp_path / "simulate-sweep-host-bw.png").stat().st_size > 0


def test_cli_refuses_a_goodput_sweep_without_gpu_only_and_an_unknown_sweep(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--goodput", "--policies", "apex,neo", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--sweep", "clock=1,2", "--out-dir", str(tmp_path)])


def test_reproduce_paper_runs_every_row_and_prints_the_papers_figures(tmp_path, caplog) -> None:
    caplog.set_level("INFO")
    args = ["--reproduce-paper", "--requests", "6", "--rate-multiples", "1", "--extend", "0", "--no-plot",
            "--out-dir", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "simulate.json").read_text())["paper"]
    ran = {(r["hardware"], r["model"], r["workload"]) for r in rows}
    assert ran == {(h, m, w) for (h, m), ws in paper.ROWS.items() for w in ws if (h, m) != ("t4", "llama3.1-8b")}
    assert all(r["claims"]["gpu-only"] == list(paper.OVER_GPU_ONLY[r["hardware"]]) for r in rows)
    assert "llama3.1-8b on t4" in caplog.text and "paper: vs gpu-only" in caplog.text
