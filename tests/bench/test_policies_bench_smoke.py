"""The policy benchmark (`apex-serve bench-policies`) runs its tiny preset end to end: every policy on every
workload, every request served to its full length, and nothing left running or mapped afterwards."""

import json
import os
import re
from pathlib import Path

from apex_tools.bench.policies import POLICIES, PRESETS, main

SHM = Path("/dev/shm")
SEGMENT = re.compile(r"^apex-serve\.(\d+)\.")


def _children() -> set[int]:
    """Live (not zombie) child processes of this process."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            pids.add(int(stat.parent.name))
    return pids


def _orphaned_segments(before: set[str]) -> list[str]:
    """New apex-serve segments whose creating process is gone (another live stack's segments are not ours)."""
    left = []
    for path in SHM.glob("apex-serve.*"):
        match = SEGMENT.match(path.name)
        if path.name not in before and match and not Path(f"/proc/{match.group(1)}").exists():
            left.append(path.name)
    return left


def test_policies_bench_tiny_runs_every_policy_on_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "policies.json"
    segments_before = {p.name for p in SHM.glob("apex-serve.*")}
    children_before = _children()
    affinity = os.sched_getaffinity(0)

    code = main(["--tiny", "--out", str(out)])

    result = json.loads(out.read_text())
    assert code == 0, {w: {p: r.get("error") for p, r in v["policies"].items()} for w, v in result["workloads"].items()}
    assert set(result["workloads"]) == {w.name for w in PRESETS["tiny"].workloads}
    for name, workload in result["workloads"].items():
        assert list(workload["policies"]) == list(POLICIES), name
        for policy, row in workload["policies"].items():
            assert row["tokens_per_s"] > 0, (name, policy)
            assert row["received_tokens"] == row["expected_tokens"], (name, policy)
            assert row["output_tokens"] == sum(row["expected_tokens"]), (name, policy)
            assert row["finish_reasons"] == ["length"], (name, policy)
            assert 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"], (name, policy)
    assert _children() <= children_before, "a benchmark process is still running"
    assert _orphaned_segments(segments_before) == []
    assert os.sched_getaffinity(0) == affinity
