"""The cost-model accuracy benchmark (`apex-serve bench-cost-model`) profiles real workers through the profiler,
runs real iterations in every mode and reports the prediction error per mode."""

import json
import subprocess
import sys
from pathlib import Path


def test_cost_model_bench_reports_errors_before_and_after_correction_for_every_mode(tmp_path: Path) -> None:
    out = tmp_path / "cost_model.json"
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "bench-cost-model", "--", "--iterations", "12", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"gpu_only", "async_overlap", "asym_pipeline"}
    for mode, row in result["modes"].items():
        assert row["count"] >= 5, mode
        # measured side by side on 2 shared cores: raw 7-14%, corrected 5-30% per mode; twice that is a broken model
        assert 0 < row["raw_mape"] < 0.5 and 0 < row["corrected_mape"] < 0.75, row
    assert "MAPE before" in done.stderr, "the table was not printed"
