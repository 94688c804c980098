"""OTLP/JSON, as the OpenTelemetry Collector's file exporter writes it: `{"resourceSpans": [...]}` per line,
camelCase fields, enums as integers and trace/span ids as lowercase hex (protobuf's own JSON mapping would
write the id bytes as base64, so ids are converted on the way out and back)."""

import base64
import binascii
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from apex_tools.trace_report.spans import Attributes, Link, Span, TraceInputError

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _id_records(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every JSON object of a request that carries ids: spans and their links."""
    for resource_spans in obj.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                yield span
                yield from span.get("links", [])


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_to_b64(value: str) -> str:
    try:
        return base64.b64encode(bytes.fromhex(value)).decode()
    except ValueError:
        raise TraceInputError(f"span id {value!r} is not hex (OTLP/JSON writes ids as hex)") from None


def request_to_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    obj = json_format.MessageToDict(request, use_integers_for_enums=True)
    for record in _id_records(obj):
        for key in _ID_FIELDS:
            if key in record:
                record[key] = _b64_to_hex(record[key])
    return obj


def json_to_request(obj: Any) -> ExportTraceServiceRequest:
    if not isinstance(obj, dict) or "resourceSpans" not in obj:
        raise TraceInputError('not OTLP JSON: expected objects of the form {"resourceSpans": [...]}')
    try:
        for record in _id_records(obj):
            for key in _ID_FIELDS:
                if key in record:
                    record[key] = _hex_to_b64(record[key])
        return json_format.ParseDict(obj, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError, binascii.Error) as exc:
        raise TraceInputError(f"not OTLP JSON: {exc}") from None


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


def attributes(pairs: Iterable[KeyValue]) -> Attributes:
    return {kv.key: any_value(kv.value) for kv in pairs}


def flatten(request: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                    name=s.name, start_unix_ns=s.start_time_unix_nano, end_unix_ns=s.end_time_unix_nano,
                    attributes=attributes(s.attributes),
                    links=tuple(Link(ln.trace_id.hex(), ln.span_id.hex(), attributes(ln.attributes)) for ln in s.links),
                    resource=resource, scope_name=scope_spans.scope.name, scope_version=scope_spans.scope.version,
                ))
    return spans


def write_otlp_json(requests: Iterable[ExportTraceServiceRequest], path: str | Path) -> Path:
    """One request per line (JSON lines), like the Collector's file exporter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for request in requests:
            out.write(json.dumps(request_to_json(request), separators=(",", ":")) + "\n")
    return path


def _json_objects(text: str) -> list[Any]:
    """A whole-file JSON value (an object or a list of them), else one JSON value per line."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        return whole if isinstance(whole, list) else [whole]
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                objects.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TraceInputError(f"line {number} is not JSON: {exc.msg}") from None
    return objects


def read_otlp_json(path: str | Path) -> list[Span]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceInputError(f"{path}: cannot read: {exc}") from None
    objects = _json_objects(text)
    if not objects:
        raise TraceInputError(f"{path}: empty, no OTLP JSON in it")
    try:
        return [span for obj in objects for span in flatten(json_to_request(obj))]
    except TraceInputError as exc:
        raise TraceInputError(f"{path}: {exc}") from None
