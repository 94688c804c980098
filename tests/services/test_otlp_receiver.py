"""The in-process OTLP/gRPC receiver, fed by the real OpenTelemetry SDK's OTLP gRPC exporter."""

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from apex_tools.otlp_receiver import OtlpReceiver, main
from apex_tools.trace_report.otlp import read_otlp_json
from apex_tools.trace_report.spans import Span
from conftest import wait_until

T0 = 1_700_000_000_000_000_000


def export_spans(endpoint: str, count_children: int = 2) -> None:
    """A request span, and an iteration span (linked to it) with children, at fixed times."""
    provider = TracerProvider(resource=Resource.create({"service.name": "apex-scheduler"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5)))
    tracer = provider.get_tracer("apex_serve.test", "1.0")
    request = tracer.start_span("chat m", start_time=T0, attributes={"gen_ai.usage.input_tokens": 7})
    it = tracer.start_span("apex.iteration", start_time=T0 + 10, links=[trace.Link(request.get_span_context())],
                           attributes={"apex.iteration.step_id": 3, "apex.iteration.mode": "async_overlap",
                                       "apex.iteration.sampled": True, "apex.overlap.hidden_ratio": 0.25,
                                       "apex.test.rows": [1, 2]})
    for layer in range(count_children):
        child = tracer.start_span("cpu_attention", context=trace.set_span_in_context(it), start_time=T0 + 20 + layer,
                                  attributes={"apex.subtask.layer": layer})
        child.end(end_time=T0 + 30 + layer)
    it.end(end_time=T0 + 100)
    request.end(end_time=T0 + 200)
    provider.shutdown()


def by_name(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def test_exported_spans_arrive_with_names_parents_links_and_attributes() -> None:
    with OtlpReceiver("127.0.0.1:0") as receiver:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", receiver.address) and not receiver.address.endswith(":0")
        export_spans(receiver.address)
        assert receiver.wait_until(lambda spans: len(spans) == 4, timeout_s=10)
        spans = by_name(receiver.spans)
    (request,), (it,), children = spans["chat m"], spans["apex.iteration"], spans["cpu_attention"]
    assert it.parent_span_id == "" and it.links[0].span_id == request.span_id
    assert it.links[0].trace_id == request.trace_id
    assert [(c.parent_span_id, c.trace_id) for c in children] == [(it.span_id, it.trace_id)] * 2
    assert it.attributes == {"apex.iteration.step_id": 3, "apex.iteration.mode": "async_overlap",
                             "apex.iteration.sampled": True, "apex.overlap.hidden_ratio": 0.25,
                             "apex.test.rows": [1, 2]}
    assert (it.start_unix_ns, it.end_unix_ns) == (T0 + 10, T0 + 100)
    assert it.service_name == "apex-scheduler" and (it.scope_name, it.scope_version) == ("apex_serve.test", "1.0")
    assert re.fullmatch(r"[0-9a-f]{32}", it.trace_id) and re.fullmatch(r"[0-9a-f]{16}", it.span_id)


def test_json_file_round_trips_with_hex_ids(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        export_spans(receiver.address)
        assert receiver.wait_until(lambda spans: len(spans) == 4, timeout_s=10)
        path = receiver.write_json(tmp_path / "trace.jsonl")
        received = receiver.spans
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines and all(set(obj) == {"resourceSpans"} for obj in lines)
    raw = [s for obj in lines for rs in obj["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", s["traceId"]) and re.fullmatch(r"[0-9a-f]{16}", s["spanId"]) for s in raw)
    assert {"startTimeUnixNano", "endTimeUnixNano"} <= set(raw[0])
    assert read_otlp_json(path) == received


def test_unix_socket_receiver_removes_its_socket_on_exit(tmp_path: Path) -> None:
    socket_path = tmp_path / "otlp.sock"
    with OtlpReceiver(f"unix://{socket_path}") as receiver:
        assert socket_path.exists()
        export_spans(receiver.address, count_children=0)
        assert receiver.wait_until(lambda spans: len(spans) == 2, timeout_s=10)
    assert not socket_path.exists()


def test_spans_beyond_the_limit_are_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), OtlpReceiver(max_spans=3) as receiver:
        export_spans(receiver.address, count_children=3)  # 5 spans, one export call each
        assert receiver.wait_until(lambda spans: len(spans) == 3, timeout_s=10)
        wait_until(lambda: receiver.dropped_spans >= 2, 10.0, "two spans to be dropped")
        assert len(receiver.spans) == 3 and receiver.dropped_spans == 2
    assert "span limit 3 reached" in caplog.text


def test_wait_until_returns_false_on_timeout() -> None:
    with OtlpReceiver() as receiver:
        started = time.monotonic()
        assert not receiver.wait_until(lambda spans: bool(spans), timeout_s=0.1)
        assert time.monotonic() - started < 2


def test_trace_collect_cli_writes_what_it_received(tmp_path: Path) -> None:
    socket_path, out = tmp_path / "collect.sock", tmp_path / "trace.jsonl"

    def send_when_listening() -> None:
        wait_until(socket_path.exists, 30.0, f"trace-collect to listen on {socket_path}")
        export_spans(f"unix://{socket_path}", count_children=0)

    sender = threading.Thread(target=send_when_listening, daemon=True)
    sender.start()
    assert main(["--address", f"unix://{socket_path}", "--out", str(out), "--duration-s", "1.5"]) == 0
    sender.join(timeout=5)
    assert sorted(s.name for s in read_otlp_json(out)) == ["apex.iteration", "chat m"]


def test_trace_collect_cli_reports_an_unbindable_address(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    address = f"unix://{tmp_path}/absent/dir/x.sock"
    assert main(["--address", address, "--out", str(tmp_path / "t.jsonl"), "--duration-s", "0.1"]) == 1
    assert f"cannot bind {address}" in caplog.text
