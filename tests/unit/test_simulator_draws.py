"""`apex-serve simulate --seeds N`: each workload drawn N times (seeds --seed .. --seed + N - 1), every policy run on
every draw, and a summary of the medians and lowest per-draw ratios over the draws."""

import json
import logging

import pytest

from apex_tools.sim import report
from apex_tools.sim.cli import main
from apex_tools.sim.engine import RunResult
from scheduler_service.config import POLICIES

ARGS = ["--hardware", "t4", "--workload", "chat", "--requests", "12", "--no-plot", "--policies", "gpu-only,neo",
        "--fit-to-accelerator"]


def run(policy: str, seed: int, throughput: float) -> RunResult:
    return RunResult(policy=policy, hardware="t4", model="m", workload="chat", num_requests=1, finished=1, rejected=0,
                     output_tokens=1, duration_s=1.0, throughput_tok_s=throughput, ttft_p50_s=0.1, ttft_p99_s=0.2,
                     tpot_p50_ms=10.0, tpot_p99_ms=20.0 + seed, iterations=1, mode_mix={}, layout_mix={},
                     mean_gpu_rows=1.0, mean_cpu_rows=0.0, mean_prefills=0.0, preemptions=0, swaps=0,
                     swap_time_share=0.0, prefill_time_share=0.0, wall_s=0.0, steady_throughput_tok_s=throughput,
                     seed=seed)


def test_every_policy_runs_on_every_draw_of_the_workload(tmp_path) -> None:
    assert main([*ARGS, "--seed", "5", "--seeds", "3", "--out-dir", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "simulate.json").read_text())["runs"]
    assert sorted((r["seed"], r["policy"]) for r in runs) == sorted(
        (seed, policy) for seed in (5, 6, 7) for policy in ("gpu-only", "neo"))
    assert all(r["finished"] == 12 for r in runs)


def test_summary_gives_median_and_lowest_per_draw_ratio_against_each_baseline() -> None:
    results = [run(policy, seed, throughput) for seed, (gpu, neo, apex) in enumerate([(10, 20, 22), (10, 20, 18),
                                                                                       (20, 40, 44)])
               for policy, throughput in zip(POLICIES, (gpu, neo, apex), strict=True)]
    lines = {line.split()[1]: line.split() for line in report.summary(results).splitlines()[2:]}
    # apex per draw: 2.2x, 1.8x, 2.2x gpu-only; 1.1x, 0.9x, 1.1x neo; neo-published did not run ("-")
    assert lines["apex"][2:] == ["3", "22.0", "21.0", "2.200x", "1.800x", "1.100x", "0.900x", "-", "-", "2.200x",
                                 "1.100x", "-"]
    assert lines["neo"][5:] == ["2.000x", "2.000x", "1.000x", "1.000x", "-", "-", "2.000x", "1.000x", "-"]


def test_one_draw_prints_no_summary(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert main([*ARGS, "--out-dir", str(tmp_path)]) == 0
    assert "draws" not in caplog.text


def test_seeds_below_one_is_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*ARGS, "--seeds", "0"])
    assert "--seeds: must be >= 1, got 0" in capsys.readouterr().err
