"""The chaos benchmark (`apex-serve bench-chaos`) on the tiny model, one kill per service: the gpu_worker's and the
scheduler's streams are cut with UNAVAILABLE and new requests succeed again, the cpu_attention_worker's streams all
complete, and nothing is left running or mapped afterwards."""

import json
import re
from pathlib import Path

from apex_tools.bench.chaos import TARGETS, main
from apex_tools.bench.faults import CPU_WORKER

SHM = Path("/dev/shm")
SEGMENT = re.compile(r"^apex-serve\.(\d+)\.")


def _orphaned_segments(before: set[str]) -> list[str]:
    """New apex-serve segments whose creating process is gone (another live stack's segments are not ours)."""
    left = []
    for path in SHM.glob("apex-serve.*"):
        match = SEGMENT.match(path.name)
        if path.name not in before and match and not Path(f"/proc/{match.group(1)}").exists():
            left.append(path.name)
    return left


def test_chaos_bench_kills_each_service_once_and_the_stack_answers_every_kill(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    segments_before = {p.name for p in SHM.glob("apex-serve.*")}

    code = main(["--streams", "4", "--max-tokens", "48", "--repeats", "1", "--recovery-timeout-s", "60",
                 "--out", str(out)])

    result = json.loads(out.read_text())
    assert list(result["trials"]) == list(TARGETS)
    for target, (trial,) in result["trials"].items():
        assert trial["in_flight"] == 4, target
        if target == CPU_WORKER:
            assert trial["completed"] == 4 and trial["errors"] == [], trial
            assert trial["cpu_resident_at_kill"] > 0, "the kill hit no stream on the CPU pool"
            assert 0 < trial["resumed_s"] and 0 < trial["reattached_s"] and 0 < trial["all_completed_s"], trial
        else:
            assert trial["ended_unavailable"] == 4, trial
            assert trial["restarted"], f"{target} was not restarted"
            assert 0 < trial["all_ended_s"] < trial["new_request_ok_s"], trial
    assert set(result["summary"]) == set(TARGETS)
    assert result["anchors"]["probe_request_s"] > 0 and result["anchors"]["undisturbed_streams_s"] > 0
    shm = result["cpu_worker_segments"]
    assert 0 < shm["after"] <= shm["before"], f"the cpu_attention_worker holds data planes left behind: {shm}"
    assert code == 0
    assert _orphaned_segments(segments_before) == []
