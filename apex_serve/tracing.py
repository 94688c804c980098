"""OpenTelemetry set-up shared by the services (DESIGN §8): a tracer provider exporting OTLP, configured by the
standard OTEL_* variables, and the gRPC interceptors that carry W3C trace context between the services.

Tracing is on when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) or OTEL_TRACES_EXPORTER names an exporter, and OTEL_SDK_DISABLED is not "true".
Off, no interceptor is installed and the engine creates no span: the hot path pays one `is None` test."""

import atexit
import logging
import os
from collections.abc import Sequence

import grpc
from opentelemetry import trace

logger = logging.getLogger(__name__)

# Probes and reflection would put a span in every trace store every 100 ms; they carry no request.
_UNTRACED_SERVICES = (
    "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection",
)
# streams that live as long as their gateway or scheduler: the requests or steps on them carry their own context and
# get their own spans
_UNTRACED_METHODS = ("/apex_serve.v1.Scheduler/Attach", "/apex_serve.v1.GpuWorker/Steps")
STEP_SPAN = "apex_serve.v1.GpuWorker/Step"  # the gpu_worker's span of a step, by call or on the Steps stream
_state: dict[str, bool] = {}
# service.name per module (OTEL_SERVICE_NAME overrides it); compose and the manifests set the same names
SERVICE_NAMES = {
    "gateway": "apex-gateway", "scheduler_service": "apex-scheduler", "gpu_worker": "apex-gpu-worker",
    "cpu_attention_worker": "apex-cpu-attention-worker", "profiler_service": "apex-profiler",
}


class _GeneratorExitDetach(logging.Filter):
    """opentelemetry-instrumentation-grpc keeps a streaming call's span current across the handler's yields. When the
    stream is cancelled (a client that stops reading after the last token), the generator is closed in another
    context, and detaching the span's context logs an ERROR with a traceback, though the span ends as it should
    (open-telemetry/opentelemetry-python-contrib#2357). This drops that record only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage() == "Failed to detach context"
            and isinstance(exc, ValueError) and isinstance(exc.__context__, GeneratorExit)
        )


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(module: str) -> bool:
    """Installs the global tracer provider once per process, for the service `module` (a key of SERVICE_NAMES).
    Returns whether tracing is on."""
    if "on" in _state:
        return _state["on"]
    _state["on"] = on = enabled()
    if not on:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # OTEL_RESOURCE_ATTRIBUTES are read by Resource.create; OTEL_SERVICE_NAME must win over our default name
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAMES[module]})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER (default parentbased_always_on)
    exporter: SpanExporter
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        exporter = _otlp_exporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    logging.getLogger("opentelemetry.context").addFilter(_GeneratorExitDetach())
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # flush what is batched
    logger.info("tracing on: service %s", resource.attributes.get("service.name"))
    return True


def _otlp_exporter():  # type: ignore[no-untyped-def]
    """OTLP over gRPC, or over HTTP when OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL says http/protobuf (that exporter
    ships in opentelemetry-exporter-otlp-proto-http, installed separately)."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if (protocol or "grpc").strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def tracer(name: str) -> trace.Tracer | None:
    """The tracer for `name`, or None when tracing is off (callers skip span work entirely)."""
    return trace.get_tracer(name) if _state.get("on") else None


def _traced_filter():  # type: ignore[no-untyped-def]
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_name(s) for s in _UNTRACED_SERVICES),
                                         *(filters.full_method_name(m) for m in _UNTRACED_METHODS)))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The OTel server interceptor (a SERVER span per call, context from the caller's traceparent) when on."""
    if not _state.get("on"):
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_filter())]


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """The OTel client interceptors (a CLIENT span per call, traceparent in the metadata) when on."""
    if not _state.get("on"):
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(filter_=_traced_filter())
