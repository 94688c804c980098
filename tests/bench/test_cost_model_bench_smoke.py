"""The cost-model accuracy benchmark (`apex-serve bench-cost-model`) gets the quick profile of real workers through the
profiler, runs real iterations in every mode, the hybrid ones alternating the overlap layouts, and reports the
prediction error of each mode and layout. It profiles afresh (a few seconds): the errors it bounds are of a profile
measured beside the steps they predict, not of one another test's stack measured under its own load."""

import json
import logging
from pathlib import Path

import pytest

from apex_tools.bench.cost_model_accuracy import main


def test_cost_model_bench_reports_errors_before_and_after_correction_for_every_mode_and_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "cost_model.json"
    caplog.set_level(logging.INFO, logger="apex_tools.bench.cost_model_accuracy")

    code = main(["--iterations", "16", "--out", str(out), "--profile-dir", str(tmp_path / "profiles")])

    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"gpu_only", "async_overlap/fused", "async_overlap/split", "asym_pipeline/fused",
                                   "asym_pipeline/split"}
    for name, row in result["runs"].items():
        assert row["count"] >= 4, name
        # 300 steps per mode on 2 shared cores: raw 9-23%, corrected 6-12% per mode and layout; 16 steps are far
        # noisier, and the suite's quick profile is taken by an earlier stack under load (one table 3.7x too high
        # gave 95% raw once): past 150% raw or 75% corrected the model is broken
        assert 0 < row["raw_mape"] < 1.5 and 0 < row["corrected_mape"] < 0.75, (name, row)
        assert row["subtasks_ns"]["linear"]["measured"] > 0, name
    hybrid = [row for name, row in result["runs"].items() if name != "gpu_only"]
    assert all(row["subtasks_ns"]["cpu_attention"]["measured"] > 0 for row in hybrid), "no CPU rows ran"
    assert result["runs"]["gpu_only"]["measured_over_fused_priced"] > 0
    assert "MAPE before" in caplog.text and "measured / raw prediction" in caplog.text, "the tables were not printed"
