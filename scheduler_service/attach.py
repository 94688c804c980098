"""The scheduler's end of one Attach stream: the requests submitted on it, their outputs gathered into one
OutputBatch per wake-up of the stream's writer (the engine delivers a step's outputs in one go, so one batch per
step), and their end: a finished output, an error update, or an abort when the stream ends first."""

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import grpc
from opentelemetry import propagate, trace

from apex_serve import convert, errors, rpc
from apex_serve.types import RequestOutput
from apex_serve.v1 import scheduler_pb2
from scheduler_service.engine_loop import EngineLoop, Outcome

logger = logging.getLogger(__name__)

REQUEST_SPAN = "apex.scheduler.request"


class _Sink:
    """One request's outcomes, handed to its session (the engine loop's OutcomeSink)."""

    __slots__ = ("_request_id", "_session")

    def __init__(self, session: "AttachSession", request_id: str) -> None:
        self._session = session
        self._request_id = request_id

    def put_nowait(self, item: Outcome) -> None:
        self._session.deliver(self._request_id, item)


class AttachSession:
    def __init__(self, loop: EngineLoop, tracer: trace.Tracer | None) -> None:
        self._loop = loop
        self._tracer = tracer
        self._live: dict[str, trace.Span | None] = {}  # request id -> its span (None: tracing off)
        self._updates: list[scheduler_pb2.RequestUpdate] = []
        self._ready = asyncio.Event()
        self._reading = True

    def handle(self, message: scheduler_pb2.AttachRequest) -> None:
        kind = message.WhichOneof("kind")
        if kind == "submit":
            self._submit(message.submit, message.trace_context)
        elif kind == "abort_request_id" and message.abort_request_id in self._live:
            self._loop.abort(message.abort_request_id)  # its ABORT output ends it

    def _submit(self, request: scheduler_pb2.SubmitRequest, carrier: Mapping[str, str]) -> None:
        request_id = request.request_id
        span = None
        if self._tracer is not None:
            span = self._tracer.start_span(REQUEST_SPAN, propagate.extract(carrier), trace.SpanKind.SERVER,
                                           {"apex.request_id": request_id})
        try:
            self._check_new(request_id)
            sampling = convert.sampling_from_pb(request.sampling)
            self._live[request_id] = span
            self._loop.submit_to(_Sink(self, request_id), request_id, list(request.prompt_token_ids), sampling,
                                 None if span is None else span.get_span_context())
        except Exception as exc:  # whatever it is, one request's failure stays its own
            self._live.pop(request_id, None)
            self._fail(request_id, exc, span)

    def _check_new(self, request_id: str) -> None:
        if not request_id:
            raise errors.InvalidArgument("request_id", "must not be empty")
        if request_id in self._live:
            raise errors.InvalidArgument("request_id", f"{request_id!r} is already running on this stream")

    def deliver(self, request_id: str, outcome: Outcome) -> None:
        if isinstance(outcome, RequestOutput):
            update = scheduler_pb2.RequestUpdate(request_id=request_id)
            convert.fill_request_output_pb(update.output, outcome)  # in place: no copy of a nested message
            self._push(update)
            if outcome.finished:
                _end(self._live.pop(request_id, None))
        else:
            self._fail(request_id, outcome, self._live.pop(request_id, None))

    def _fail(self, request_id: str, exc: Exception, span: trace.Span | None) -> None:
        code, details, kind = rpc.error_status(exc)
        if code == grpc.StatusCode.INTERNAL:
            logger.error("request %s failed", request_id, exc_info=exc)
        self._push(scheduler_pb2.RequestUpdate(request_id=request_id, error_code=code.value[0], error_message=details,
                                               error_kind=kind))
        if span is not None:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            span.end()

    def _push(self, update: scheduler_pb2.RequestUpdate) -> None:
        self._updates.append(update)
        self._ready.set()

    async def serve(self, messages: AsyncIterator[scheduler_pb2.AttachRequest]
                    ) -> AsyncIterator[scheduler_pb2.OutputBatch]:
        """The stream's batches while its client sends requests (or, once it half-closed, until every request on it
        has ended); when the stream ends first, its requests are aborted."""
        reader = asyncio.create_task(self._read(messages), name="attach-reader")
        try:
            while self._reading or self._live or self._updates:
                await self._ready.wait()
                self._ready.clear()
                if self._updates:
                    updates, self._updates = self._updates, []
                    yield scheduler_pb2.OutputBatch(updates=updates)
        finally:
            reader.cancel()
            self._abort_live()

    async def _read(self, messages: AsyncIterator[scheduler_pb2.AttachRequest]) -> None:
        try:
            async for message in messages:
                self.handle(message)
        except Exception as exc:  # the client's half broke: the call is ending
            logger.debug("Attach: reading the client's messages failed: %s", exc)
        finally:
            self._reading = False
            self._ready.set()

    def _abort_live(self) -> None:
        live, self._live = self._live, {}
        for request_id, span in live.items():
            self._loop.abort(request_id)
            _end(span)


def _end(span: trace.Span | None) -> None:
    if span is not None:
        span.end()
