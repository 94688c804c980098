"""The stack overhead benchmark (`apex-serve bench`) runs end to end and writes the figures it prints."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_writes_stack_with_and_without_async_scheduling_in_process_and_transformers_rates(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "apex_tools", "bench", "--", "--presets", "default", "--batches", "1",
         "--new-tokens", "8", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    for key in ("stack_tok_s", "stack_sync_tok_s", "in_process_tok_s", "transformers_tok_s"):
        assert row[key] > 0, key
    assert row["stack_over_in_process"] == row["stack_tok_s"] / row["in_process_tok_s"]
    assert row["stack_sync_over_in_process"] == row["stack_sync_tok_s"] / row["in_process_tok_s"]
    assert "stack/in-proc" in done.stderr, "the table was not printed"
