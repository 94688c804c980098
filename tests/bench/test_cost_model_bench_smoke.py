"""The cost-model accuracy benchmark (`apex-serve bench-cost-model`) profiles real workers through the profiler,
runs real iterations in every mode, the hybrid ones alternating the overlap layouts, and reports the prediction error
of each mode and layout."""

import json
import subprocess
import sys
from pathlib import Path


def test_cost_model_bench_reports_errors_before_and_after_correction_for_every_mode_and_layout(tmp_path: Path
                                                                                                 ) -> None:
    out = tmp_path / "cost_model.json"
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "bench-cost-model", "--", "--iterations", "16", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"gpu_only", "async_overlap/fused", "async_overlap/split", "asym_pipeline/fused",
                                   "asym_pipeline/split"}
    for name, row in result["runs"].items():
        assert row["count"] >= 4, name
        # 300 steps per mode on 2 shared cores: raw 11-32%, corrected 8-21% per mode and layout; 8 steps of a layout
        # are far noisier (raw up to 55% with the quick profile taken under load); past 75% the model is broken
        assert 0 < row["raw_mape"] < 0.75 and 0 < row["corrected_mape"] < 0.75, (name, row)
        assert row["subtasks_ns"]["linear"]["measured"] > 0, name
    hybrid = [row for name, row in result["runs"].items() if name != "gpu_only"]
    assert all(row["subtasks_ns"]["cpu_attention"]["measured"] > 0 for row in hybrid), "no CPU rows ran"
    assert result["runs"]["gpu_only"]["measured_over_fused_priced"] > 0
    assert "MAPE before" in done.stderr and "measured / raw prediction" in done.stderr, "the tables were not printed"
