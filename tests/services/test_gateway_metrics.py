"""The gateway's /metrics over two real scheduler replicas (their own metrics ports off): the gateway's families and
each replica's engine families labelled with its address; a replica that stops answering is left out and counted;
HEAD on /metrics and /health."""

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from apex_serve import rpc
from apex_tools.processes import Service, ServiceGroup

NUM_REQUESTS = 6
MAX_TOKENS = 4


@dataclass
class Gateway:
    url: str
    schedulers: dict[str, Service]  # replica address -> its scheduler process


@pytest.fixture(scope="module")
def gateway(default_model_dir: Path) -> Iterator[Gateway]:
    run_dir = Path(tempfile.mkdtemp(prefix="apx-", dir="/tmp"))
    with ServiceGroup() as services:
        schedulers = {}
        for name in ("a", "b"):
            worker, scheduler = f"unix://{run_dir}/{name}-w.sock", f"unix://{run_dir}/{name}-s.sock"
            services.spawn("gpu_worker", worker,
                           ["--model-dir", str(default_model_dir), "--address", worker, "--num-kv-blocks", "32"])
            schedulers[scheduler] = services.spawn(
                "scheduler_service", scheduler, ["--address", scheduler, "--worker-address", worker, "--policy",
                                                 "gpu-only"],
            )
        port, http_port = rpc.free_tcp_port(), rpc.free_tcp_port()
        services.start("gateway", f"127.0.0.1:{port}", [
            "--model-dir", str(default_model_dir), "--address", f"127.0.0.1:{port}",
            "--http-address", f"127.0.0.1:{http_port}", "--scheduler-address", ",".join(schedulers),
        ], timeout_s=120)
        yield Gateway(f"http://127.0.0.1:{http_port}", schedulers)
    shutil.rmtree(run_dir, ignore_errors=True)


def _samples(url: str) -> list[Sample]:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def _by_replica(samples: list[Sample], name: str, **labels: str) -> dict[str, float]:
    return {
        s.labels["replica"]: s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    }


def test_metrics_carry_every_replicas_engine_families_labelled_with_its_address(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        for i in range(NUM_REQUESTS):
            done = client.post("/v1/completions", json={
                "model": "apex-tiny-llama", "prompt": f"metrics {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            })
            assert done.status_code == 200, done.text
    samples = _samples(gateway.url)
    replicas = set(gateway.schedulers)

    ttft = _by_replica(samples, "apex_time_to_first_token_seconds_count")
    assert set(ttft) == replicas and sum(ttft.values()) == NUM_REQUESTS
    assert all(n > 0 for n in ttft.values()), f"a replica served nothing: {ttft}"
    assert set(_by_replica(samples, "apex_kv_cache_usage_perc", pool="accelerator")) == replicas
    assert set(_by_replica(samples, "apex_num_requests_waiting")) == replicas
    itl = _by_replica(samples, "apex_inter_token_latency_seconds_count")
    assert sum(itl.values()) == NUM_REQUESTS * (MAX_TOKENS - 1)
    e2e = _by_replica(samples, "apex_e2e_request_latency_seconds_bucket", le="+Inf")
    assert sum(e2e.values()) == NUM_REQUESTS
    assert _by_replica(samples, "apex_replica_metrics_errors_total") == dict.fromkeys(replicas, 0.0)
    gateway_own = [s for s in samples if s.name == "apex_http_requests_total"]
    assert gateway_own and all("replica" not in s.labels for s in gateway_own)


def test_head_answers_the_status_and_content_type_without_a_body(gateway: Gateway) -> None:
    metrics = httpx.head(f"{gateway.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and metrics.content == b""
    assert metrics.headers["content-type"] == httpx.get(f"{gateway.url}/metrics").headers["content-type"]
    health = httpx.head(f"{gateway.url}/health", timeout=10)
    assert health.status_code == 200 and health.content == b""


def test_a_replica_that_does_not_answer_is_left_out_and_counted(gateway: Gateway) -> None:
    gone, scheduler = next(iter(gateway.schedulers.items()))
    scheduler.process.kill()
    scheduler.process.wait()
    for _ in range(2):
        samples = _samples(gateway.url)
    assert set(_by_replica(samples, "apex_time_to_first_token_seconds_count")) == set(gateway.schedulers) - {gone}
    assert _by_replica(samples, "apex_replica_metrics_errors_total")[gone] == 2
