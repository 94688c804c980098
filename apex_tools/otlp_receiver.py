"""An in-process OTLP/gRPC trace receiver: collects the spans a service exports, for tests, `apex-serve
trace-collect` and trace reports without an OpenTelemetry Collector."""

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from types import TracebackType

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from apex_tools.trace_report.otlp import flatten, write_otlp_json
from apex_tools.trace_report.spans import Span

logger = logging.getLogger(__name__)

SpanPredicate = Callable[[list[Span]], bool]


def _trim(request: ExportTraceServiceRequest, room: int) -> int:
    """Keep at most `room` spans of the request, in order; the number dropped."""
    dropped = 0
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            keep = max(min(room, len(scope_spans.spans)), 0)
            dropped += len(scope_spans.spans) - keep
            del scope_spans.spans[keep:]
            room -= keep
    return dropped


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Binds `address` (host:port, port 0 for a free one, or unix:PATH) on start; `address` then names the
    bound endpoint, usable as an OTLP exporter's endpoint. Keeps at most `max_spans` spans."""

    def __init__(self, address: str = "127.0.0.1:0", max_spans: int = 1_000_000, workers: int = 4) -> None:
        if max_spans < 1:
            raise ValueError(f"max_spans must be positive, got {max_spans}")
        self.address = address
        self.max_spans = max_spans
        self._workers = workers
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._changed = threading.Condition()
        self._requests: list[ExportTraceServiceRequest] = []
        self._count = 0  # spans kept
        # flattened only when read: Export stays cheap, so a receiver sharing cores with the stack perturbs it less
        self._spans: list[Span] = []
        self._num_flattened = 0  # requests already in _spans
        self._dropped = 0

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        with self._changed:
            dropped = _trim(request, self.max_spans - self._count)
            kept = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
            if kept:
                self._requests.append(request)
                self._count += kept
            if dropped:
                if not self._dropped:
                    logger.warning("span limit %d reached: dropping further spans", self.max_spans)
                self._dropped += dropped
            self._changed.notify_all()
        if not dropped:
            return ExportTraceServiceResponse()
        # OTLP's partial success tells the exporter not to retry the rejected spans.
        return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
            rejected_spans=dropped, error_message=f"receiver span limit {self.max_spans} reached"))

    def start(self) -> "OtlpReceiver":
        if self._server is not None:
            raise RuntimeError("the receiver is already started")
        executor = futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="otlp-receiver")
        server = grpc.server(executor)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            executor.shutdown()
            raise OSError(f"cannot bind {self.address}: {exc}") from None
        if self.address.endswith(":0"):
            self.address = f"{self.address[:-2]}:{port}"
        server.start()
        self._server, self._executor = server, executor
        logger.info("OTLP/gRPC trace receiver on %s", self.address)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is None:
            return
        self._server.stop(grace_s).wait()
        # grpc.server does not own the executor it is given: its worker threads would outlive the receiver.
        self._executor.shutdown(wait=True)
        self._server = self._executor = None
        if self._dropped:
            logger.warning("dropped %d spans beyond the limit of %d", self._dropped, self.max_spans)

    def __enter__(self) -> "OtlpReceiver":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def spans(self) -> list[Span]:
        """A snapshot of the spans received so far, in arrival order."""
        with self._changed:
            return list(self._flattened())

    @property
    def dropped_spans(self) -> int:
        with self._changed:
            return self._dropped

    def wait_until(self, predicate: SpanPredicate, timeout_s: float) -> bool:
        """Block until `predicate(spans)` holds (True) or `timeout_s` passes (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._flattened()), timeout=timeout_s)

    def _flattened(self) -> list[Span]:
        """Every span kept, flattening the requests that arrived since the last read (call with the lock held)."""
        for request in self._requests[self._num_flattened:]:
            self._spans.extend(flatten(request))
        self._num_flattened = len(self._requests)
        return self._spans

    def write_json(self, path: str | Path) -> Path:
        """The received requests as OTLP JSON lines (hex ids), readable by `apex-serve trace-report`."""
        with self._changed:
            requests = list(self._requests)
        return write_otlp_json(requests, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apex-serve trace-collect",
                                     description="receive OTLP/gRPC traces and write them as OTLP JSON lines")
    parser.add_argument("--address", default="127.0.0.1:4317", help="host:port or unix:PATH to listen on")
    parser.add_argument("--out", required=True, help="the OTLP JSON lines file to write")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    parser.add_argument("--max-spans", type=int, default=1_000_000, help="spans kept at most; later ones dropped")
    args = parser.parse_args(argv)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    out = Path(args.out)
    try:
        # Fail now, not after a long collection, if the output cannot be written.
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        with OtlpReceiver(args.address, max_spans=args.max_spans) as receiver:
            logger.info("collecting %s", "until Ctrl-C" if args.duration_s is None else f"for {args.duration_s:g} s")
            stop.wait(args.duration_s)
    except (OSError, ValueError) as exc:
        logger.error("trace-collect: %s", exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    receiver.write_json(out)
    logger.info("wrote %d spans to %s (%d dropped)", len(receiver.spans), out, receiver.dropped_spans)
    return 0
