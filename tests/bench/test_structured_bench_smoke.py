"""The structured outputs benchmark (`apex-serve bench-structured`) runs its tiny setup end to end on its one stack
(apex with a small device pool): every json_schema and guided_choice reply holds to its grammar, the scheduler ran
hybrid iterations, every cost arm measured its rows to their length and the worker's step time, and the JSON and
markdown table are written. It keeps its profile where the suite's stacks keep theirs, so the suite profiles the
default model once."""

import json
from pathlib import Path

from apex_tools.bench.structured import ARMS, SETUPS, main
from apex_tools.launcher import StackConfig


def test_structured_bench_tiny_validates_every_reply_and_measures_every_cost_arm(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"

    code = main(["--tiny", "--out", str(out), "--profile-dir", StackConfig.profile_dir])

    assert code == 0
    result = json.loads(out.read_text())
    setup = SETUPS["tiny"]
    assert setup.pools == ("cpu_pool",)
    for pool in setup.pools:
        for load, requests in (("json", setup.json_requests), ("choice", setup.choice_requests)):
            metrics = result[pool][load]
            assert metrics["valid"] == requests, f"{pool} {load}: {metrics['failures']}"
            assert metrics["tokens_per_s"] > 0, f"{pool} {load}"
    assert result["cpu_pool"]["json"]["scheduler"]["hybrid_iterations"] > 0, result["cpu_pool"]["json"]["scheduler"]
    for arm in ARMS:
        runs = result["cost"]["runs"][arm]
        assert len(runs) == setup.repeats and not any(run["errors"] for run in runs), (arm, runs)
        assert all(run["output_tokens"] == setup.rows * setup.row_tokens for run in runs), (arm, runs)
        assert all(run["engine_step_ms"] > 0 for run in runs), f"{arm}: no step of every row decoding measured"
    assert "beside json / beside unconstrained" in out.with_suffix(".md").read_text()
