"""The hybrid benchmark (`apex-serve bench-hybrid`) runs its tiny setup end to end, every mode in both overlap
layouts and the decode-graph contenders, and writes what it prints."""

import json
import subprocess
import sys
from pathlib import Path


def test_hybrid_bench_tiny_setup_reports_transport_and_every_mode_and_layout(tmp_path: Path) -> None:
    out = tmp_path / "hybrid.json"
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "bench-hybrid", "--", "--tiny", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    transport = result["transport"]
    assert transport["doorbell"]["p50_us"] > 0 and transport["grpc_stream"]["p50_us"] > 0
    assert [row["mode"] for row in result["modes"]] == [
        "gpu_only", "async_overlap/fused", "async_overlap/split", "asym_pipeline/fused", "asym_pipeline/split",
        "gpu_only/graphs", "async_overlap/fused/graphs",
    ]
    assert [row["layout"] for row in result["modes"]] == ["fused", "fused", "split", "fused", "split", "fused", "fused"]
    assert [row["graphs"] for row in result["modes"]] == [False] * 5 + [True] * 2
    assert result["device"] == "cpu"
    assert result["modes"][0]["vs_gpu_only"] == 1.0, "gpu_only is the anchor"
    for row in result["modes"]:
        assert row["tokens_per_s"] > 0 and row["vs_gpu_only"] > 0
        assert len(row["tokens_per_s_rounds"]) == result["setup"]["rounds"]
        assert (row["hidden_fraction"] is None) == (row["cpu_rows"] == 0), row
    assert "gRPC / doorbell" in done.stderr, "the table was not printed"
