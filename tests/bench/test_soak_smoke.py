"""The soak benchmark (`apex-serve bench-soak`) on the tiny model: 9 s of open-loop load with random cancels and one
SIGKILL of the cpu_attention_worker at 3 s loses no request, brings the worker back, leaves both KV pools free, and
writes every figure of its report to the JSON."""

import json
from pathlib import Path

import pytest

from apex_tools.bench.faults import CPU_WORKER, SERVICES
from apex_tools.bench.soak import KILL_AIM_S, main

DURATION_S = 9.0
FIRST_KILL_S = 3.0  # past the warm-up (the first 10% of the load), early enough for the restarted worker's samples


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    """(exit code, JSON result) of one short soak."""
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    code = main(["--duration-s", str(DURATION_S), "--first-kill-s", str(FIRST_KILL_S), "--capacity-s", "2",
                 "--rss-every-s", "1", "--cancel-fraction", "0.2", "--out", str(out)])
    return code, json.loads(Path(out).read_text())


def test_soak_with_a_cpu_worker_kill_loses_no_request_and_fails_none(soak: tuple[int, dict]) -> None:
    code, result = soak
    r = result["requests"]
    assert r["lost"] == 0, r["lost_by_reason"]
    assert r["failed"] == 0, f"the kill failed requests: {r['failed_by_error']}"
    assert r["sent"] == r["completed"] + r["cancelled"] + r["failed"] + r["lost"]
    assert r["completed"] > 0 and r["cancelled"] > 0, r
    assert code == 0


def test_soak_kills_the_cpu_worker_once_and_it_comes_back(soak: tuple[int, dict]) -> None:
    _, result = soak
    assert result["num_kills"] == result["num_recoveries"] == 1, result["kills"]
    (kill,) = result["kills"]
    assert FIRST_KILL_S <= kill["at_s"] < FIRST_KILL_S + KILL_AIM_S + 1, kill
    assert kill["new_pid"] != kill["old_pid"] and 0 < kill["recovery_s"] < 12, kill
    assert kill["running_cpu_at_kill"] > 0, "the kill hit no request on the CPU pool"
    assert result["end"]["cpu_pool_losses"] == 1
    assert not result["end"]["cpu_pool_degraded"]
    rss = result["rss"][CPU_WORKER]
    assert rss["restarts"] == 1 and "restarted" in rss["note"], rss["note"]
    assert {s["pid"] for s in rss["samples"]} == {kill["old_pid"], kill["new_pid"]}


def test_soak_ends_with_both_kv_pools_free(soak: tuple[int, dict]) -> None:
    _, result = soak
    b = result["end"]
    assert b["settled"], "requests were still running or queued, or the CPU pool was not back, at the end"
    assert b["free"] == b["total"] > 0, "accelerator KV blocks leaked"
    assert b["free_cpu"] == b["total_cpu"] > 0, "CPU KV blocks leaked"
    assert b["back_to_total"]


def test_soak_json_has_every_figure_of_the_report(soak: tuple[int, dict]) -> None:
    _, result = soak
    assert set(result) == {"config", "capacity", "load", "requests", "latency", "kills", "num_kills",
                           "num_recoveries", "rss", "end"}
    capacity, load = result["capacity"], result["load"]
    assert capacity["requests_per_s"] > 0 and capacity["tokens_per_s"] > 0 and capacity["concurrency"] > 0
    assert load["load_fraction"] == 0.8
    assert load["offered_requests_per_s"] == pytest.approx(0.8 * capacity["requests_per_s"])
    assert load["achieved_requests_per_s"] > 0 and load["mean_running"] > 0 and load["max_running_cpu"] > 0
    for key in ("failed_by_error", "lost_by_reason"):
        assert isinstance(result["requests"][key], dict), key
    latency = result["latency"]
    assert 0 < latency["ttft_p50_ms"] <= latency["ttft_p99_ms"]
    assert 0 < latency["tpot_p50_ms"] <= latency["tpot_p99_ms"]
    assert latency["requests"] == result["requests"]["completed"]
    assert list(result["rss"]) == list(SERVICES)
    for module, rss in result["rss"].items():
        assert rss["growth_pct"] is not None and rss["private_growth_pct"] is not None, module
        assert len(rss["samples"]) >= 5 and all(s["rss_kib"] > 0 for s in rss["samples"]), module
    assert result["config"]["device_kv_blocks"] == result["end"]["total"]
