"""The self-contained HTML report: the summary table, the timeline PNG inlined as base64 and the sampled
iterations' two overlap values side by side. No scripts, no external resources: it opens offline."""

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from apex_tools.trace_report.iterations import Iteration
from apex_tools.trace_report.summary import SummaryRow, table_cells
from apex_tools.trace_report.timeline import title

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"""


def _table(headers: Sequence[str], body: Sequence[Sequence[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _timeline(shown: Sequence[Iteration], png: Path | None) -> str:
    if png is None:
        return "<p>No sampled iterations (no subtask spans) in this trace: no timeline.</p>"
    image = base64.b64encode(png.read_bytes()).decode()
    return (_table(["iteration"], [[title(it)] for it in shown], "iterations")
            + f'\n<img alt="overlap timeline" src="data:image/png;base64,{image}">')


def render_html(rows: Sequence[SummaryRow], shown: Sequence[Iteration], png: Path | None, source: str,
                path: Path) -> Path:
    headers, body = table_cells(rows)
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>APEX overlap report</title><style>{STYLE}</style></head>
<body>
<h1>APEX overlap report</h1>
<p>Source: {html.escape(source)}. Overlap = hidden CPU attention / CPU attention, time-weighted. "overlap" uses
the step timings of every iteration; for sampled iterations the step timings and the per-layer subtask spans
give the same quantity two ways, and should agree.</p>
<h2>Summary</h2>
{_table(headers, body, "summary")}
<h2>Timeline: the last {len(shown)} sampled iterations</h2>
{_timeline(shown, png)}
</body></html>
""", encoding="utf-8")
    return path
