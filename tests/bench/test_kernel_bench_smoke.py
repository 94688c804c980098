"""The kernel benchmark (`apex-serve bench-kernel`) runs its tiny grid end to end and writes what it prints."""

import json
import subprocess
import sys
from pathlib import Path


def test_kernel_bench_tiny_grid_writes_rows_ratios_and_machine_figures(tmp_path: Path) -> None:
    out = tmp_path / "kernel.json"
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "bench-kernel", "--", "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["read_gbs_1t"] > 0 and result["machine"]["isa"] in result["machine"]["isas"]
    assert {(r["dtype"], r["threads"]) for r in result["rows"]} == {
        ("bfloat16", 1), ("bfloat16", 2), ("float32", 1), ("float32", 2)
    }
    for row in result["rows"]:
        rates = ("anchor_gbs", "paged_read_gbs", "kernel_gbs", "kernel_hot_gbs", "torch_folded_gbs", "torch_paged_gbs")
        for key in rates:
            assert row[key] > 0, key
        assert row["ratios"]["kernel_vs_anchor"] == row["kernel_gbs"] / row["anchor_gbs"]
        assert row["max_abs_diff_vs_torch_paged"] < 0.05  # torch rounds q to bf16 for bf16 KV
    assert [s["threads"] for s in result["scaling"]] == ["1->2", "1->2"]
    assert "k/anch" in done.stderr, "the table was not printed"
