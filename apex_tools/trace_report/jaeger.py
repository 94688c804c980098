"""Iteration spans from Jaeger's HTTP query API (`GET /api/traces`, the API its UI uses), converted to the
same span records as OTLP JSON. Jaeger keeps microseconds, so subtask times lose their nanoseconds."""

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from apex_serve.span_attributes import ITERATION_SPAN
from apex_tools.trace_report.spans import Attributes, Link, Span, TraceInputError

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class JaegerQuery:
    url: str  # the query service, e.g. http://localhost:16686
    service: str = "apex-scheduler"
    lookback: str = "1h"  # Jaeger's own spelling: 90s, 30m, 1h, 2d
    limit: int = 200
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        lookback_seconds(self.lookback)
        if self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")


def lookback_seconds(lookback: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd])", lookback.strip())
    if not match:
        raise ValueError(f"lookback {lookback!r}: expected a number and a unit s, m, h or d (e.g. 1h)")
    return int(match[1]) * _UNITS_S[match[2]]


def query_url(query: JaegerQuery, now_s: float) -> str:
    """start/end (µs) bound the search, as Jaeger's UI sends them beside `lookback`."""
    end_us = int(now_s * 1e6)
    params = {
        "service": query.service, "operation": ITERATION_SPAN, "limit": query.limit, "lookback": query.lookback,
        "start": end_us - lookback_seconds(query.lookback) * 1_000_000, "end": end_us,
    }
    return f"{query.url.rstrip('/')}/api/traces?{urllib.parse.urlencode(params)}"


def _tags(tags: list[dict[str, Any]]) -> Attributes:
    return {t["key"]: t.get("value") for t in tags}


def _span(raw: dict[str, Any], processes: dict[str, Any]) -> Span:
    parent, links = "", []
    for ref in raw.get("references") or []:
        if ref.get("refType") == "CHILD_OF" and ref.get("traceID") == raw["traceID"] and not parent:
            parent = ref["spanID"].zfill(16)
        else:  # FOLLOWS_FROM, and further CHILD_OF references: how Jaeger shows OTel links
            links.append(Link(ref["traceID"].zfill(32), ref["spanID"].zfill(16)))
    process = processes.get(raw.get("processID", ""), {})
    resource = _tags(process.get("tags") or []) | {"service.name": process.get("serviceName", "")}
    start_ns = int(raw["startTime"]) * 1000
    return Span(
        trace_id=raw["traceID"].zfill(32), span_id=raw["spanID"].zfill(16), parent_span_id=parent,
        name=raw["operationName"], start_unix_ns=start_ns, end_unix_ns=start_ns + int(raw["duration"]) * 1000,
        attributes=_tags(raw.get("tags") or []), links=tuple(links), resource=resource,
    )


def convert(payload: Any) -> list[Span]:
    """Jaeger's `{"data": [trace, ...]}` to span records."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise TraceInputError('not a Jaeger API answer: expected {"data": [traces]}')
    try:
        return [_span(raw, trace.get("processes") or {}) for trace in payload["data"] for raw in trace["spans"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TraceInputError(f"not a Jaeger trace: bad span ({type(exc).__name__}: {exc})") from None


def fetch(query: JaegerQuery) -> list[Span]:
    url = query_url(query, time.time())
    try:
        with urllib.request.urlopen(url, timeout=query.timeout_s) as response:
            payload = json.load(response)
    except urllib.error.HTTPError as exc:
        raise TraceInputError(f"Jaeger query {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TraceInputError(f"Jaeger at {query.url} unreachable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TraceInputError(f"Jaeger query {url} did not answer JSON: {exc.msg}") from None
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if errors:
        raise TraceInputError(f"Jaeger query {url} failed: {errors}")
    return convert(payload)
