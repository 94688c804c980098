"""The self-contained HTML report: the summary table, then the timeline PNG inlined as base64 after one caption per
drawn iteration (why it was chosen, whether its two overlap measures agree and why not, its idle time by cause).
No scripts, no external resources: it opens offline."""

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from apex_tools.trace_report.panels import AGREEMENT_TOLERANCE, Selection, gaps_note, measures_note
from apex_tools.trace_report.summary import SummaryRow, table_cells
from apex_tools.trace_report.timeline import title

STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}dl.panels dt{font-weight:bold;margin-top:.6em}
dl.panels dd{margin-left:1.5em}p.note{background:#fff4e5;padding:4px 8px}"""


def _table(headers: Sequence[str], body: Sequence[Sequence[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _timeline(selection: Selection, png: Path | None) -> str:
    if png is None:
        return "<p>No sampled iterations (no subtask spans) in this trace: no timeline.</p>"
    image = base64.b64encode(png.read_bytes()).decode()
    note = f'<p class="note">{html.escape(selection.note)}</p>' if selection.note else ""
    captions = "".join(
        f"<dt>{html.escape(p.role)} ({html.escape(p.why)}): {html.escape(title(p.iteration))}</dt>"
        f"<dd>{html.escape(measures_note(p.iteration))}</dd><dd>{html.escape(gaps_note(p.iteration))}</dd>"
        for p in selection.panels)
    return f'{note}<dl class="panels">{captions}</dl>\n<img alt="overlap timeline" src="data:image/png;base64,{image}">'


def _heading(selection: Selection) -> str:
    roles = " and ".join(p.role for p in selection.panels) or "no"
    return f"{roles} sampled iteration{'s' if len(selection.panels) > 1 else ''}"


def render_html(rows: Sequence[SummaryRow], selection: Selection, png: Path | None, source: str,
                path: Path) -> Path:
    headers, body = table_cells(rows)
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>APEX overlap report</title><style>{STYLE}</style></head>
<body>
<h1>APEX overlap report</h1>
<p>Source: {html.escape(source)}. Overlap = hidden CPU attention / CPU attention, time-weighted. "overlap" uses
the step timings of every iteration: they count every moment the accelerator waited for the CPU as exposed CPU
attention. For sampled iterations the per-layer subtask spans also give it exactly: CPU attention during which the
accelerator did no work. The two agree when the accelerator's waits are all CPU attention; they part when the wait
also covers the CPU side's start or hand-back latency, or when the accelerator idled without waiting. Each panel
below says which (agreement: within {AGREEMENT_TOLERANCE:.2f}).</p>
<h2>Summary</h2>
{_table(headers, body, "summary")}
<h2>Timeline: {_heading(selection)}</h2>
{_timeline(selection, png)}
</body></html>
""", encoding="utf-8")
    return path
