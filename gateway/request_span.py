"""The span of one generation, with the OpenTelemetry GenAI semantic-convention attributes (DESIGN §8). Its context
goes with the Submit call to the scheduler, whose iteration spans link back to it."""

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from apex_serve.types import FinishReason, SamplingParams

SYSTEM = "apex_serve"


class RequestSpan:
    def __init__(
        self, tracer: trace.Tracer, request_id: str, chat: bool, model_name: str, sampling: SamplingParams,
        stop: tuple[str, ...], input_tokens: int,
    ) -> None:
        operation = "chat" if chat else "text_completion"
        s = sampling
        attributes: dict[str, str | int | float | list[str]] = {
            "gen_ai.operation.name": operation,
            "gen_ai.system": SYSTEM,
            "gen_ai.request.model": model_name,
            "gen_ai.request.max_tokens": s.max_tokens,
            "gen_ai.request.temperature": s.temperature,
            "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.top_k": s.top_k,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.response.id": request_id,
            "gen_ai.response.model": model_name,
        }
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        if stop:
            attributes["gen_ai.request.stop_sequences"] = list(stop)
        self._span = tracer.start_span(f"{operation} {model_name}", kind=SpanKind.INTERNAL, attributes=attributes)

    @property
    def context(self) -> context.Context:
        """A context with this span current: calls made in it are its children."""
        return trace.set_span_in_context(self._span)

    def ended(self, completion_tokens: int, finish_reason: FinishReason) -> None:
        self._span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        self._span.set_attribute("gen_ai.response.finish_reasons", [finish_reason.value])

    def failed(self, exc: BaseException) -> None:
        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        self._span.end()
