"""`apex-serve trace-report`: from an OTLP JSON file (the Collector's file exporter, `apex-serve trace-collect`)
or a Jaeger query, write timeline.png, report.html, chrome_trace.json, summary.json/.csv and iterations.csv
into --out, and log the summary table."""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from apex_tools.trace_report.chrome import write_chrome_trace
from apex_tools.trace_report.iterations import build_iterations
from apex_tools.trace_report.jaeger import JaegerQuery, fetch
from apex_tools.trace_report.otlp import read_otlp_json
from apex_tools.trace_report.page import render_html
from apex_tools.trace_report.panels import choose_panels
from apex_tools.trace_report.spans import Span, TraceInputError
from apex_tools.trace_report.summary import format_table, summarize, write_summary
from apex_tools.trace_report.timeline import render

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apex-serve trace-report", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("trace", nargs="?", metavar="FILE", help="OTLP JSON: one object, or one per line")
    source.add_argument("--jaeger", metavar="URL", help="Jaeger query service, e.g. http://localhost:16686")
    parser.add_argument("--service", default="apex-scheduler", help="Jaeger: the scheduler's service.name")
    parser.add_argument("--lookback", default="1h", help="Jaeger: how far back to search (90s, 30m, 1h, 2d)")
    parser.add_argument("--limit", type=int, default=200, help="Jaeger: traces fetched at most")
    parser.add_argument("--out", default="bench_results/trace_report", help="folder for the report's files")
    return parser


def _read(args: argparse.Namespace) -> tuple[list[Span], str]:
    if args.trace:
        return read_otlp_json(args.trace), args.trace
    try:
        query = JaegerQuery(args.jaeger, service=args.service, lookback=args.lookback, limit=args.limit)
    except ValueError as exc:
        raise TraceInputError(str(exc)) from None
    return fetch(query), f"Jaeger {args.jaeger} (service {args.service}, last {args.lookback})"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spans, source = _read(args)
        iterations = build_iterations(spans)
    except TraceInputError as exc:
        logger.error("trace-report: %s", exc)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(iterations)
    logger.info("%d iterations from %s\n%s", len(iterations), source, format_table(rows))
    written = write_summary(rows, iterations, out)
    sampled = [it for it in iterations if it.subtasks]
    selection = choose_panels(sampled)
    png = None
    if sampled:
        png = render(selection, out / "timeline.png")
        written += [png, write_chrome_trace(sampled, out / "chrome_trace.json")]
    else:
        logger.warning("no sampled iterations (no subtask spans): no timeline or Chrome trace, only the summary")
    written.append(render_html(rows, selection, png, source, out / "report.html"))
    for path in written:
        logger.info("wrote %s", path)
    return 0
