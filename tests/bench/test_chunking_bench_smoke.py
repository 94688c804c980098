"""The chunked prefill benchmark (`apex-serve bench-chunking`) runs its tiny setup end to end: both budgets serve every
request to its length, the long prompt's timeline shows it split into chunks under the small budget and prefilled in
one step under the large one, and the JSON, markdown table and PNG are written."""

import json
from pathlib import Path

from apex_tools.bench.chunking import SETUPS, main


def test_chunking_bench_tiny_serves_every_request_and_chunks_only_under_the_small_budget(tmp_path: Path) -> None:
    out = tmp_path / "chunking.json"

    code = main(["--tiny", "--out", str(out)])

    assert code == 0
    result = json.loads(out.read_text())
    setup = SETUPS["tiny"]
    assert set(result["runs"]) == {"chunked", "whole"}
    for name, run in result["runs"].items():
        assert run["lengths_ok"], (name, run["received_tokens"])
        assert run["finish_reasons"] == ["length"], name
        assert 0 < run["decodes"]["tpot_p50_ms"] <= run["decodes"]["tpot_p99_ms"], name
        assert len(run["long_prompts"]["ttft_ms"]) == setup.long_prompts, name
        assert run["timeline"]["steps"], f"{name}: no step of the long arrival's timeline was read"
    prefill_steps = {name: [s for s in run["timeline"]["steps"] if s["num_prefills"]]
                     for name, run in result["runs"].items()}
    chunks = -(-setup.long_prompt_len // setup.chunked_budget)
    assert len(prefill_steps["chunked"]) >= chunks, f"the long prompt was not split: {prefill_steps['chunked']}"
    assert len(prefill_steps["whole"]) == 1, f"the long prompt was not prefilled whole: {prefill_steps['whole']}"
    assert "Iteration timeline" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
