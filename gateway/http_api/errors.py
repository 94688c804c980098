"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with the status an
OpenAI client expects: 400 bad input or past a bound on it (naming the field), 401 API key, 404 model or route,
413 body too large, 429 requests in flight."""

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from apex_serve import errors
from gateway.http_api.responses import ErrorBody, ErrorDetail
from gateway.http_api.schemas import FIELD_NAMES
from gateway.http_api.tokenization_schemas import FIELD_NAMES as TOKENIZATION_FIELD_NAMES

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code: nobody reads the response; it shows in the metrics
_APEX_STATUS: tuple[tuple[type[errors.ApexError], int], ...] = (
    (errors.InvalidArgument, 400), (errors.NotFound, 404), (errors.ResourceExhausted, 429),
    (errors.FailedPrecondition, 503), (errors.Unavailable, 503),
)
_GRPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_TYPES = {
    401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable_error",
}
_CODES = {401: "invalid_api_key"}
_FIELD_NAMES = FIELD_NAMES | TOKENIZATION_FIELD_NAMES
_MEANINGS = {
    400: "Bad input, or past a bound on it (prompt bytes, stop strings, messages); `param` names the field.",
    401: "Missing or wrong API key.", 404: "The model is not served here.",
    413: "The request body is too large.", 429: "Past the admission limit of requests in flight.",
    500: "Internal error.", 503: "No scheduler replica is serving, or the scheduler failed.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route for the error statuses it answers with."""
    return {status: {"model": ErrorBody, "description": _MEANINGS[status]} for status in statuses}


def generation_responses(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a generation route: the body whole, or with `stream: true` server-sent events
    whose data is a chunk, an error (after the first event) or the closing `[DONE]`; and every error status it
    answers with. The chunk's schema must be in the document's components (openapi.py)."""
    chunk_data = {"anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"} for model in (chunk, ErrorBody)]}
    data = {"anyOf": [
        {"type": "string", "contentMediaType": "application/json", "contentSchema": chunk_data}, {"const": "[DONE]"},
    ]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    streamed = {"text/event-stream": {"schema": event}}
    return {200: {"model": body, "content": streamed}, **error_responses(400, 401, 404, 413, 429, 500, 503)}


def error_body(status: int, message: str, param: str | None = None) -> ErrorBody:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=_CODES.get(status)))


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status, headers=headers)


def describe(exc: Exception) -> tuple[int, ErrorBody]:
    """The status and body for an exception raised while serving a generation."""
    if isinstance(exc, errors.ApexError):
        status = next((s for cls, s in _APEX_STATUS if isinstance(exc, cls)), 500)
        return status, error_body(status, str(exc), getattr(exc, "field", None))
    if isinstance(exc, grpc.aio.AioRpcError):
        status = _GRPC_STATUS.get(exc.code(), 500)
        return status, error_body(status, f"scheduler: {exc.code().name}: {exc.details()}")
    return 500, error_body(500, "internal error; see the gateway log")


def _response(exc: Exception) -> JSONResponse:
    status, body = describe(exc)
    return JSONResponse(body.model_dump(), status_code=status)


def _param(loc: Sequence[Any]) -> str | None:
    """`messages[0].role` from pydantic's ("body", "messages", 0, "role"); a union member's tag
    (such as "list[int]") ends the path, since what follows is inside that member."""
    path = ""
    for part in loc[1:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES:
            path += f".{part}" if path else part
        else:
            break
    return path or None


def _error_param(error: Mapping[str, Any]) -> str | None:
    """The field an error names; an unknown field of an object that takes none is named itself."""
    param = _param(error["loc"])
    name = error["loc"][-1]
    if error["type"] == "extra_forbidden" and param is not None and isinstance(name, str) and param != name \
            and not param.endswith(f".{name}"):
        return f"{param}.{name}"
    return param


async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400; union members' messages are joined."""
    found = exc.errors()
    first = found[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    param = _error_param(first)
    messages = dict.fromkeys(e["msg"] for e in found if _error_param(e) == param)
    return error_response(400, f"{param or 'request body'}: {' or '.join(messages)}", param)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code in (404, 405) and message == HTTPStatus(exc.status_code).phrase:
        message = f"{message}: {request.method} {request.url.path}"
    return error_response(exc.status_code, message, headers=exc.headers)


async def _generation_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, grpc.aio.AioRpcError):
        logger.warning("%s %s: the scheduler failed: %s %s", request.method, request.url.path, exc.code(),
                       exc.details())
    return _response(exc)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """Starlette re-raises the exception after this response, and uvicorn logs it with its traceback."""
    return _response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(errors.ApexError, _generation_error)
    app.add_exception_handler(grpc.aio.AioRpcError, _generation_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal)
