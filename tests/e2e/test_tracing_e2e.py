"""Tracing across the real stack: five service processes over Unix sockets export OTLP to a real receiver in this
process; the span tree has the gateway's GenAI request spans, the scheduler's request spans under them (context
carried in each request's Attach message), iteration spans linked to those, the gpu_worker's Step spans under the
iterations, and per-layer subtask spans on sampled iterations."""

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from apex_serve import rpc
from apex_serve.sdk import Client
from apex_tools.launcher import Stack, StackConfig
from apex_tools.otlp_receiver import OtlpReceiver
from apex_tools.trace_report.spans import Span

NUM_REQUESTS = 8
MAX_TOKENS = 24
SAMPLE_EVERY = 4
SUBTASKS = {"device_linear", "device_attention", "staging", "cpu_attention"}


@pytest.fixture(scope="module")
def traced(default_model_dir: Path) -> Iterator[tuple[Stack, OtlpReceiver]]:
    with OtlpReceiver("127.0.0.1:0") as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.address}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms, not every 5 s
        }
        config = StackConfig(
            model_dir=str(default_model_dir), port=rpc.free_tcp_port(), http_port=rpc.free_tcp_port(), metrics_port=0,
            run_dir=tempfile.mkdtemp(prefix="apx-", dir="/tmp"), num_kv_blocks=12, policy="apex",
            sample_layers_every=SAMPLE_EVERY,
        )
        with Stack(config, env=env) as stack:
            with Client(config.gateway_address) as client, ThreadPoolExecutor(NUM_REQUESTS) as pool:
                # at once: together they overflow the 12-block accelerator pool, so apex puts rows on the CPU
                list(pool.map(lambda i: client.generate(f"request {i} " * (i + 1), max_tokens=MAX_TOKENS,
                                                        temperature=0.0, ignore_eos=True), range(NUM_REQUESTS)))
            chat = httpx.post(f"http://{config.http_address}/v1/chat/completions", timeout=60, json={
                "model": Path(config.model_dir).name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3, "stop": ["zz"]})
            assert chat.status_code == 200, chat.text
            assert receiver.wait_until(_all_arrived, timeout_s=30), "the services did not export the expected spans"
            yield stack, receiver


def _by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def _ancestors(span: Span, index: dict[str, Span]) -> list[Span]:
    chain = []
    while span.parent_span_id in index:
        span = index[span.parent_span_id]
        chain.append(span)
    return chain


def _request_spans(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.service_name == "apex-gateway" and "gen_ai.operation.name" in s.attributes]


def _scheduler_request_spans(spans: list[Span]) -> list[Span]:
    """The scheduler's span of each request it was sent."""
    return [s for s in spans if s.service_name == "apex-scheduler" and s.name == "apex.scheduler.request"]


def _worker_steps(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.service_name == "apex-gpu-worker" and s.name.endswith("GpuWorker/Step")]


def _iterations_of_worker_steps(spans: list[Span]) -> list[str]:
    """The span id of each worker Step span's parent: the plans go on the Steps stream, each with its iteration's
    context, and the worker's span of the step is that iteration's child ("" for a root)."""
    index = _by_id(spans)
    chains = [_ancestors(s, index) for s in _worker_steps(spans)]
    return [chain[0].span_id if chain else "" for chain in chains]


def _all_arrived(spans: list[Span]) -> bool:
    """Every request's spans on both sides, and spans of sampled iterations from the scheduler and the worker."""
    iterations = {s.span_id for s in spans if s.name == "apex.iteration"}
    subtask_parents = {s.parent_span_id for s in spans if s.name in SUBTASKS}
    return (len(_request_spans(spans)) >= NUM_REQUESTS + 1 and len(_scheduler_request_spans(spans)) >= NUM_REQUESTS + 1
            and bool(subtask_parents) and subtask_parents <= iterations
            and iterations <= set(_iterations_of_worker_steps(spans))
            and any(s.service_name == "apex-gpu-worker" for s in spans))


def test_request_spans_carry_the_genai_attributes(traced: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = traced
    requests = [s for s in _request_spans(receiver.spans) if s.attributes["gen_ai.operation.name"] != "chat"]
    assert len(requests) == NUM_REQUESTS
    model = Path(stack.config.model_dir).name
    for span in requests:
        a = span.attributes
        assert a["gen_ai.operation.name"] == "text_completion" and span.name == f"text_completion {model}"
        assert a["gen_ai.request.model"] == model and a["gen_ai.request.max_tokens"] == MAX_TOKENS
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] == MAX_TOKENS
        assert list(a["gen_ai.response.finish_reasons"]) == ["length"]


def test_an_http_chat_request_has_a_chat_span_with_its_stop_sequences_and_usage(
    traced: tuple[Stack, OtlpReceiver],
) -> None:
    stack, receiver = traced
    model = Path(stack.config.model_dir).name
    (chat,) = [s for s in _request_spans(receiver.spans) if s.attributes["gen_ai.operation.name"] == "chat"]
    assert chat.name == f"chat {model}" and chat.attributes["gen_ai.request.max_tokens"] == 3
    assert list(chat.attributes["gen_ai.request.stop_sequences"]) == ["zz"]
    assert chat.attributes["gen_ai.usage.output_tokens"] <= 3
    assert list(chat.attributes["gen_ai.response.finish_reasons"])[0] in ("stop", "length")


def test_scheduler_request_spans_are_children_of_the_gateway_request_spans(
    traced: tuple[Stack, OtlpReceiver],
) -> None:
    _, receiver = traced
    spans = receiver.spans
    submits = _scheduler_request_spans(spans)
    request_ids = {s.span_id for s in _request_spans(spans)}
    assert len(submits) >= NUM_REQUESTS
    for submit in submits:
        assert submit.parent_span_id in request_ids, "the scheduler's request span lost the gateway's context"
        assert submit.attributes["apex.request_id"]


def test_iterations_link_the_requests_they_served_and_the_worker_steps_are_their_children(
    traced: tuple[Stack, OtlpReceiver],
) -> None:
    _, receiver = traced
    spans = receiver.spans
    iterations = {s.span_id: s for s in spans if s.name == "apex.iteration"}
    submits = {s.span_id for s in _scheduler_request_spans(spans)}
    linked = {link.span_id for it in iterations.values() for link in it.links}
    assert submits <= linked, "some request was served by no iteration that links to it"
    modes = {it.attributes["apex.iteration.mode"] for it in iterations.values()}
    assert modes & {"async_overlap", "asym_pipeline"}, f"the tiny pool should force CPU rows, modes: {modes}"
    under = _iterations_of_worker_steps(spans)
    assert all(i == "" or i in iterations for i in under), "a worker Step span hangs under something else"
    assert set(iterations) <= set(under), "an iteration's plan did not carry its context to the worker"


def test_sampled_iterations_have_per_layer_subtask_spans_on_both_lanes(traced: tuple[Stack, OtlpReceiver]) -> None:
    _, receiver = traced
    spans = receiver.spans
    iterations = {s.span_id: s for s in spans if s.name == "apex.iteration"}
    children: dict[str, list[Span]] = {}
    for s in spans:
        if s.name in SUBTASKS:
            children.setdefault(s.parent_span_id, []).append(s)
    assert children and set(children) <= set(iterations)
    for parent_id, subtasks in children.items():
        iteration = iterations[parent_id]
        assert iteration.attributes["apex.iteration.sampled"] is True
        assert iteration.attributes["apex.iteration.step_id"] % SAMPLE_EVERY == 0
        for s in subtasks:
            assert s.attributes["apex.subtask.kind"] == s.name
            assert s.attributes["apex.subtask.lane"] == ("cpu" if s.name == "cpu_attention" else "accelerator")
            assert s.start_unix_ns <= s.end_unix_ns
    hybrid = [subtasks for parent, subtasks in children.items()
              if iterations[parent].attributes["apex.iteration.cpu_rows"] > 0]
    assert hybrid, "no sampled iteration ran CPU rows"
    layers = {s.attributes["apex.subtask.layer"] for s in hybrid[0] if s.name == "cpu_attention"}
    assert layers == set(range(len(layers))) and len(layers) >= 2, "CPU attention missing for some layer"
    unsampled = [it for it in iterations.values() if not it.attributes["apex.iteration.sampled"]]
    assert unsampled and not any(it.span_id in children for it in unsampled)
