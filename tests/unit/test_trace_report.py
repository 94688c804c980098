"""`apex-serve trace-report` on spans recorded with the real OpenTelemetry SDK at hand-set times, where each
iteration's overlap is known exactly: from an OTLP JSON file, from a Jaeger-API-shaped answer, and on bad
input."""

import base64
import http.server
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from apex_serve.overlap import Overlap
from apex_tools.trace_report.cli import main
from apex_tools.trace_report.iterations import Iteration, SubtaskBar
from apex_tools.trace_report.otlp import read_otlp_json, write_otlp_json
from apex_tools.trace_report.panels import Selection, choose_panels, measures_note

T0 = 1_700_000_000_000_000_000  # ns
MS = 1_000_000

# (step, mode, iteration [start, end) in ms from T0, step-timings overlap in ms (cpu, hidden, device idle,
# cpu idle), subtasks in ms from the iteration start (kind, layer, sub_batch, start, end))
ITERATIONS: list[tuple[int, str, tuple[int, int], tuple[float, ...], list[tuple[str, int, int, int, int]]]] = [
    (1, "gpu_only", (0, 5), (0, 0, 0, 4), []),
    # Per layer: CPU attention 10 ms, 6 of them under device_linear/device_attention → 0.6; 13 ms window with
    # 9 ms of device work (4 idle) and 10 of CPU work (3 idle).
    (2, "async_overlap", (10, 40), (20, 12, 8, 6), [
        (kind, layer, 0, start + 13 * layer, end + 13 * layer)
        for layer in (0, 1)
        for kind, start, end in [("device_linear", 0, 4), ("cpu_attention", 2, 12), ("device_attention", 4, 8),
                                 ("staging", 12, 13)]
    ]),
    # Two sub-batches: CPU attention (8 ms) entirely under device_linear → 1.0 from the subtasks; the step
    # timings say 7 of 8 ms (0.875): the report must show both, not mix them.
    (3, "asym_pipeline", (50, 65), (8, 7, 1, 2), [
        ("device_linear", 0, 0, 0, 5), ("cpu_attention", 0, 1, 0, 5),
        ("device_linear", 0, 1, 5, 10), ("cpu_attention", 0, 0, 5, 8),
    ]),
    (4, "async_overlap", (70, 80), (10, 4, 6, 0), []),
]


def record_scenario() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "apex-scheduler"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("apex_serve.test")
    request = tracer.start_span("chat test-model", start_time=T0, attributes={"gen_ai.operation.name": "chat"})
    for step, mode, (start, end), (cpu, hidden, device_idle, cpu_idle), subtasks in ITERATIONS:
        attributes = {
            "apex.iteration.step_id": step, "apex.iteration.mode": mode, "apex.iteration.num_prefills": 0,
            "apex.iteration.gpu_rows": 8, "apex.iteration.cpu_rows": 0 if mode == "gpu_only" else 4,
            "apex.iteration.cpu_sat_out": 0, "apex.iteration.sampled": bool(subtasks),
            "apex.overlap.hidden_ratio": hidden / cpu if cpu else 0.0,
            "apex.overlap.cpu_attention_ns": int(cpu * MS), "apex.overlap.hidden_ns": int(hidden * MS),
            "apex.overlap.device_idle_ns": int(device_idle * MS), "apex.overlap.cpu_idle_ns": int(cpu_idle * MS),
        }
        it = tracer.start_span("apex.iteration", start_time=T0 + start * MS, attributes=attributes,
                               links=[trace.Link(request.get_span_context())])
        parent = trace.set_span_in_context(it)
        for kind, layer, sub_batch, s, e in subtasks:
            lane = "cpu" if kind == "cpu_attention" else "accelerator"
            child = tracer.start_span(kind, context=parent, start_time=T0 + (start + s) * MS, attributes={
                "apex.subtask.kind": kind, "apex.subtask.lane": lane, "apex.subtask.layer": layer,
                "apex.subtask.sub_batch": sub_batch})
            child.end(end_time=T0 + (start + e) * MS)
        it.end(end_time=T0 + end * MS)
    request.end(end_time=T0 + 90 * MS)
    provider.shutdown()
    return list(exporter.get_finished_spans())


def write_scenario(path: Path) -> Path:
    return write_otlp_json([encode_spans(record_scenario())], path)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report run on the OTLP JSON file, shared by the output checks below."""
    tmp = tmp_path_factory.mktemp("report")
    assert main([str(write_scenario(tmp / "trace.jsonl")), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def rows_by_mode(out: Path) -> dict[str, dict[str, Any]]:
    return {row["mode"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}


def check_summary(rows: dict[str, dict[str, Any]]) -> None:
    assert list(rows) == ["gpu_only", "async_overlap", "asym_pipeline", "overall"]
    assert {m: r["iterations"] for m, r in rows.items()} == {
        "gpu_only": 1, "async_overlap": 2, "asym_pipeline": 1, "overall": 4}
    assert {m: r["mix_pct"] for m, r in rows.items()} == {
        "gpu_only": 25.0, "async_overlap": 50.0, "asym_pipeline": 25.0, "overall": 100.0}
    assert rows["gpu_only"]["overlap_steps"] is None  # no CPU attention: no ratio, not a 0 that drags means
    assert rows["async_overlap"]["overlap_steps"] == pytest.approx(16 / 30)
    assert rows["async_overlap"]["overlap_sampled_steps"] == pytest.approx(0.6)
    assert rows["async_overlap"]["overlap_sampled_subtasks"] == pytest.approx(0.6)
    assert rows["asym_pipeline"]["overlap_sampled_steps"] == pytest.approx(0.875)
    assert rows["asym_pipeline"]["overlap_sampled_subtasks"] == pytest.approx(1.0)
    overall = rows["overall"]
    assert overall["sampled"] == 2
    assert overall["overlap_steps"] == pytest.approx(23 / 38)
    assert overall["overlap_sampled_subtasks"] == pytest.approx(20 / 28)
    assert rows["async_overlap"]["device_idle_ms"] == pytest.approx(7.0)
    assert rows["async_overlap"]["cpu_idle_ms"] == pytest.approx(3.0)
    assert rows["async_overlap"]["device_idle_ms_subtasks"] == pytest.approx(8.0)
    assert rows["async_overlap"]["cpu_idle_ms_subtasks"] == pytest.approx(6.0)
    assert rows["asym_pipeline"]["device_idle_ms_subtasks"] == pytest.approx(0.0)
    assert rows["asym_pipeline"]["cpu_idle_ms_subtasks"] == pytest.approx(2.0)


def test_summary_overlap_idle_and_mode_mix_from_otlp_json(report: Path) -> None:
    check_summary(rows_by_mode(report))


def test_summary_csv_and_iterations_csv_are_written(report: Path) -> None:
    summary_csv = (report / "summary.csv").read_text().splitlines()
    assert summary_csv[0].startswith("mode,iterations,mix_pct,overlap_steps")
    assert [line.split(",")[0] for line in summary_csv[1:]] == ["gpu_only", "async_overlap", "asym_pipeline", "overall"]
    iterations_csv = (report / "iterations.csv").read_text().splitlines()
    assert len(iterations_csv) == 1 + len(ITERATIONS)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_timeline_png_is_a_valid_image_of_plausible_size(report: Path) -> None:
    data = (report / "timeline.png").read_bytes()
    width, height = png_size(data)
    assert width >= 800 and height >= 250, (width, height)
    assert len(data) > 10_000


def test_html_is_self_contained_with_the_table_and_the_image(report: Path) -> None:
    page = (report / "report.html").read_text()
    assert '<table class="summary">' in page and "async_overlap" in page and "overall" in page
    assert "step 3 · asym_pipeline" in page and "overlap 1.00 (step timings 0.88)" in page
    image = page.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(image) == (report / "timeline.png").read_bytes()
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_chrome_trace_has_a_process_per_sampled_iteration_and_lane_threads_in_microseconds(report: Path) -> None:
    events = json.loads((report / "chrome_trace.json").read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(processes.values()) == ["step 2 (async_overlap)", "step 3 (asym_pipeline)"]
    step2 = next(pid for pid, name in processes.items() if name.startswith("step 2"))
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name" and e["pid"] == step2}
    assert {"accelerator", "cpu"} <= set(threads.values())
    slices = [e for e in events if e["ph"] == "X" and e["pid"] == step2 and e["name"] != "apex.iteration"]
    assert len(slices) == 8
    cpu = sorted((e for e in slices if e["name"] == "cpu_attention"), key=lambda e: e["ts"])
    assert all(threads[e["tid"]] == "cpu" for e in cpu)
    assert all(threads[e["tid"]] == "accelerator" for e in slices if e["name"] != "cpu_attention")
    # µs from the first sampled iteration's start (step 2 at T0 + 10 ms): layer 0's CPU attention at +2 ms.
    assert (cpu[0]["ts"], cpu[0]["dur"], cpu[0]["args"]) == (2000.0, 10000.0, {"layer": 0, "sub_batch": 0})
    assert (cpu[1]["ts"], cpu[1]["args"]["layer"]) == (15000.0, 1)


def test_html_draws_the_typical_and_the_worst_hybrid_iteration_and_says_why_their_measures_differ(
        report: Path) -> None:
    """Steps 2 (0.6 by both measures) and 3 (1.0 by the intervals, 0.875 by the step timings) are the sampled hybrid
    iterations: 3 is the median, 2 the worst. Step 3's accelerator waited 1 ms by its step timings while no CPU
    attention was exposed in its intervals."""
    page = (report / "report.html").read_text()
    typical, worst = page.index("typical (median hidden ratio of 2"), page.index("worst (lowest hidden ratio of 2")
    assert typical < page.index("step 3 · asym_pipeline") < worst < page.index("step 2 · async_overlap")
    assert "The two measures agree within 0.05 (0.60 and 0.60)." in page
    assert ("Step timings 0.88 &lt; intervals 1.00: the accelerator waited 1.00 ms, but by the intervals CPU "
            "attention ran unhidden for only 0.00 ms; for the other 1.00 ms of the wait") in page
    assert "should agree" not in page
    idle = "Accelerator idle: waiting for the CPU 8.00 ms · scheduling / step overhead 4.00 ms · staging 2.00 ms"
    assert idle in page


def _iteration(step: int, ratio: float, idle_ms: float = 0.0, cpu: bool = True, duration_ms: int = 10,
               waited_ms: float = 0.0, step_cpu_ms: float = 4.0) -> Iteration:
    """A sampled iteration whose intervals hide `ratio` of 4 ms of CPU attention under device work and then leave
    the accelerator idle for the exposed rest plus `idle_ms`; its step timings say `waited_ms` of waiting."""
    start = T0 + step * 100 * MS
    resume = start + 4 * MS + int(idle_ms * MS)
    bars = [SubtaskBar("device_linear", "accelerator", 0, 0, start, start + round(4 * MS * ratio)),
            SubtaskBar("device_linear", "accelerator", 0, 0, resume, resume + MS)]
    if cpu:
        bars.append(SubtaskBar("cpu_attention", "cpu", 0, 0, start, start + 4 * MS))
    step_cpu, waited = int(step_cpu_ms * MS), int(waited_ms * MS)
    return Iteration(step, "async_overlap" if cpu else "gpu_only", 0, 2, 2 if cpu else 0, 0, True, start,
                     start + duration_ms * MS, Overlap(step_cpu, max(step_cpu - waited, 0), waited, 0), tuple(bars))


def test_panels_are_the_median_and_the_lowest_hidden_ratio_among_hybrid_iterations() -> None:
    its = [_iteration(1, 0.9), _iteration(2, 0.2), _iteration(3, 0.5), _iteration(4, 0.0, cpu=False),
           _iteration(5, 0.7)]
    selection = choose_panels(its)
    assert [(p.role, p.iteration.step_id) for p in selection.panels] == [("typical", 5), ("worst", 2)]
    assert selection.note is None
    assert selection.panels[0].why == "median hidden ratio of 4 sampled hybrid iterations"


def test_the_worst_of_equal_ratios_is_the_most_idle() -> None:
    its = [_iteration(1, 0.0, idle_ms=1), _iteration(2, 0.0, idle_ms=3), _iteration(3, 0.8)]
    assert [p.iteration.step_id for p in choose_panels(its).panels] == [1, 2]


def test_one_hybrid_iteration_is_drawn_once_with_a_note() -> None:
    selection = choose_panels([_iteration(1, 0.0, cpu=False), _iteration(2, 0.4)])
    assert [(p.role, p.iteration.step_id) for p in selection.panels] == [("typical", 2)]
    assert selection.note and "both the typical and the worst" in selection.note


def test_without_hybrid_iterations_the_median_duration_one_is_drawn_with_a_note() -> None:
    its = [_iteration(i, 0.0, cpu=False, duration_ms=d) for i, d in ((1, 30), (2, 10), (3, 20))]
    selection = choose_panels(its)
    assert [(p.role, p.iteration.step_id) for p in selection.panels] == [("sampled", 3)]
    assert selection.note and "None of the 3 sampled iterations had CPU attention" in selection.note
    assert choose_panels([]) == Selection([], None)


@pytest.mark.parametrize("it, expected", [
    (_iteration(1, 0.5, waited_ms=2.0), "The two measures agree within 0.05 (0.50 and 0.50)."),
    (_iteration(1, 0.5, waited_ms=3.5), ("Step timings 0.12 < intervals 0.50: the accelerator waited 3.50 ms, but "
                                         "by the intervals CPU attention ran unhidden for only 2.00 ms; for the "
                                         "other 1.50 ms of the wait")),
    (_iteration(1, 0.5, waited_ms=0.5), ("Step timings 0.88 > intervals 0.50: 1.50 ms of CPU attention ran while "
                                         "the accelerator was idle without waiting for it")),
    (_iteration(1, 0.5, step_cpu_ms=0), "The step timings recorded no CPU attention"),
    (_iteration(1, 0.0, cpu=False), "No CPU attention ran"),
])
def test_the_caption_says_whether_the_two_measures_agree_and_why_not(it: Iteration, expected: str) -> None:
    assert measures_note(it).startswith(expected), measures_note(it)


def test_collector_file_exporter_line_is_read(tmp_path: Path) -> None:
    """A line as the Collector's file exporter writes it (hex ids, int64 as strings, enums as integers), typed
    by hand so the reader is not only checked against our own writer."""
    line = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "apex-scheduler"}}]},
        "scopeSpans": [{"scope": {"name": "s"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "parentSpanId": "",
            "name": "apex.iteration", "kind": 1, "startTimeUnixNano": "1544712660000000000",
            "endTimeUnixNano": "1544712661000000000", "attributes": [
                {"key": "apex.iteration.step_id", "value": {"intValue": "42"}},
                {"key": "apex.iteration.sampled", "value": {"boolValue": False}},
                {"key": "apex.overlap.hidden_ratio", "value": {"doubleValue": 0.5}}],
            "status": {}}]}]}]}
    path = tmp_path / "collector.json"
    path.write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    spans = read_otlp_json(path)
    assert [(s.trace_id, s.span_id, s.parent_span_id) for s in spans] == [
        ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "")] * 2
    assert spans[0].attributes == {"apex.iteration.step_id": 42, "apex.iteration.sampled": False,
                                   "apex.overlap.hidden_ratio": 0.5}
    assert spans[0].start_unix_ns == 1544712660000000000 and spans[0].service_name == "apex-scheduler"
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0  # no sampled iterations: summary only
    assert rows_by_mode(tmp_path / "out")["overall"]["iterations"] == 1  # the duplicate line counted once


def jaeger_answer(spans: list[ReadableSpan]) -> dict[str, Any]:
    """Jaeger's /api/traces shape for the SDK's spans: one trace per trace id, links as FOLLOWS_FROM."""
    def tag(key: str, value: Any) -> dict[str, Any]:
        kind = {bool: "bool", int: "int64", float: "float64"}.get(type(value), "string")
        return {"key": key, "type": kind, "value": value}

    traces: dict[str, dict[str, Any]] = {}
    for s in spans:
        trace_id = f"{s.context.trace_id:032x}"
        refs = [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": f"{s.parent.span_id:016x}"}] if s.parent else []
        refs += [{"refType": "FOLLOWS_FROM", "traceID": f"{ln.context.trace_id:032x}",
                  "spanID": f"{ln.context.span_id:016x}"} for ln in s.links]
        traces.setdefault(trace_id, {"traceID": trace_id, "spans": [], "processes": {
            "p1": {"serviceName": "apex-scheduler", "tags": [tag("telemetry.sdk.language", "python")]}}})
        traces[trace_id]["spans"].append({
            "traceID": trace_id, "spanID": f"{s.context.span_id:016x}", "operationName": s.name, "references": refs,
            "startTime": s.start_time // 1000, "duration": (s.end_time - s.start_time) // 1000,
            "tags": [tag(k, v) for k, v in s.attributes.items()], "processID": "p1"})
    return {"data": list(traces.values()), "total": 0, "limit": 0, "offset": 0, "errors": None}


@pytest.fixture
def jaeger(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering /api/traces like Jaeger's query service. It only tests the conversion of
    Jaeger's JSON, not a real Jaeger. Yields its URL and the request paths it saw."""
    body = json.dumps(request.param).encode()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("jaeger", [jaeger_answer(record_scenario())], indirect=True)
def test_jaeger_query_answer_gives_the_same_summary(jaeger: tuple[str, list[str]], tmp_path: Path) -> None:
    url, seen = jaeger
    rc = main(["--jaeger", url, "--service", "apex-scheduler", "--lookback", "2h", "--limit", "50",
               "--out", str(tmp_path)])
    assert rc == 0
    check_summary(rows_by_mode(tmp_path))
    assert len(seen) == 1 and seen[0].startswith("/api/traces?")
    for param in ("service=apex-scheduler", "operation=apex.iteration", "limit=50", "lookback=2h", "start=", "end="):
        assert param in seen[0], (param, seen[0])


@pytest.mark.parametrize("jaeger", [{"data": None, "errors": [{"code": 500, "msg": "storage down"}]}], indirect=True)
def test_jaeger_error_answer_is_a_clear_error(jaeger: tuple[str, list[str]], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--jaeger", jaeger[0], "--out", str(tmp_path)]) == 1
    assert "storage down" in caplog.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_input(tmp_path: Path, case: str) -> list[str]:
    if case == "missing file":
        return [str(tmp_path / "absent.jsonl")]
    if case == "unreachable jaeger":
        return ["--jaeger", f"http://127.0.0.1:{free_port()}"]
    path = tmp_path / "input.json"
    if case == "no iteration spans":
        write_otlp_json([encode_spans([s for s in record_scenario() if s.name == "chat test-model"])], path)
    else:
        path.write_text({"not otlp json": '{"traceEvents": []}', "not json": "hello\n", "empty": "",
                         "base64 ids": json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
                             {"traceId": "W47/95gDgQPSabYzgT/GDA==", "spanId": "7uGbfsPBsXQ="}]}]}]})}[case])
    return [str(path)]


@pytest.mark.parametrize("case, message", [
    ("missing file", "no such file"),
    ("no iteration spans", "no 'apex.iteration' spans"),
    ("not otlp json", "not OTLP JSON"),
    ("not json", "not JSON"),
    ("empty", "empty"),
    ("base64 ids", "is not hex"),
    ("unreachable jaeger", "unreachable"),
])
def test_bad_input_exits_nonzero_with_a_clear_message(case: str, message: str, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main([*bad_input(tmp_path, case), "--out", str(tmp_path / "out")]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0].getMessage(), caplog.text
    assert errors[0].exc_info is None
