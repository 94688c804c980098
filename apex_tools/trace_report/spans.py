"""Backend-neutral span records: what both the OTLP JSON reader and the Jaeger reader produce."""

from dataclasses import dataclass, field
from typing import Any

Attributes = dict[str, Any]


class TraceInputError(Exception):
    """The trace input cannot be read or holds nothing to report; the message says which."""


@dataclass(frozen=True)
class Link:
    trace_id: str  # lowercase hex, 32 digits
    span_id: str  # lowercase hex, 16 digits
    attributes: Attributes = field(default_factory=dict)


@dataclass(frozen=True)
class Span:
    """One span flattened with its resource and instrumentation scope."""

    trace_id: str  # lowercase hex, 32 digits
    span_id: str  # lowercase hex, 16 digits
    parent_span_id: str  # "" for a root span
    name: str
    start_unix_ns: int
    end_unix_ns: int
    attributes: Attributes = field(default_factory=dict)
    links: tuple[Link, ...] = ()
    resource: Attributes = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""

    @property
    def service_name(self) -> str:
        return str(self.resource.get("service.name", ""))

    @property
    def duration_ns(self) -> int:
        return self.end_unix_ns - self.start_unix_ns
