"""NVIDIA's aiperf, unmodified, against a real stack's HTTP port: a small streaming load, and its server-metrics export
(a scrape of the gateway's /metrics, on by default) holds the engine's TTFT and KV usage families of the replica."""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from apex_tools.launcher import Stack
from conftest import running_stack

pytest.importorskip("aiperf")

REQUESTS = 8
AIPERF_TIMEOUT_S = 180  # start-up of aiperf's services (~10 s here) and a load of well under a minute


def _without_offline_mode() -> dict[str, str]:
    """aiperf's HF offline mode looks a tokenizer up in the hub cache only, never in a directory; given a directory,
    aiperf reads it and asks no hub anyway."""
    return {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}


@pytest.fixture(scope="module")
def stack(default_model_dir: Path) -> Iterator[Stack]:
    with running_stack(default_model_dir, policy="gpu-only") as s:
        yield s


def test_aiperf_server_metrics_export_has_the_engine_families_per_replica(stack: Stack, tmp_path: Path) -> None:
    model_dir = Path(stack.config.model_dir)
    replica = next(address for module, address, _ in stack.commands() if module == "scheduler_service")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "aiperf"), "profile",
         "--model", model_dir.name, "--url", f"http://{stack.config.http_address}",
         "--endpoint-type", "completions", "--streaming", "--tokenizer", str(model_dir),
         "--use-server-token-count", "--extra-inputs", "ignore_eos:true",
         "--request-count", str(REQUESTS), "--concurrency", "2", "--isl", "16", "--osl", "8",
         "--request-timeout-seconds", "30", "--random-seed", "0",
         "--no-gpu-telemetry", "--ui", "none", "--artifact-dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_S,
        env=_without_offline_mode() | {"AIPERF_DATASET_MMAP_BASE_PATH": str(tmp_path)},  # not a folder left in /tmp
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    export = json.loads((tmp_path / "server_metrics_export.json").read_text())
    scraped = f"http://{stack.config.http_address}/metrics"
    assert export["summary"]["endpoints_successful"] == [scraped]
    metrics = export["metrics"]

    ttft = metrics["apex_time_to_first_token_seconds"]
    assert ttft["type"] == "histogram"
    [series] = ttft["series"]
    assert series["endpoint_url"] == scraped and series["labels"] == {"replica": replica}
    assert series["stats"]["count"] == REQUESTS

    usage = metrics["apex_kv_cache_usage_perc"]
    assert usage["type"] == "gauge"
    assert {"pool": "accelerator", "replica": replica} in [s["labels"] for s in usage["series"]]
    for family in ("apex_inter_token_latency_seconds", "apex_e2e_request_latency_seconds",
                   "apex_num_requests_waiting", "apex_http_requests"):
        assert family in metrics, f"{family} missing from aiperf's export"
