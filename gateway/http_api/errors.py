"""Errors in OpenAI's JSON shape with the status an OpenAI client expects."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from apex_serve import errors

logger = logging.getLogger(__name__)

_STATUS: dict[type[errors.ApexError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
    errors.FailedPrecondition: (503, "service_unavailable"),
}


def error_response(status: int, kind: str, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def apex_error_response(exc: errors.ApexError) -> JSONResponse:
    status, kind = next((v for cls, v in _STATUS.items() if isinstance(exc, cls)), (500, "internal_error"))
    return error_response(status, kind, str(exc), getattr(exc, "field", None))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [p for p in first.get("loc", ()) if p != "body"]
        param = str(loc[0]) if loc else None  # the request field; deeper parts name union members
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, "invalid_request_error", message, param)

    @app.exception_handler(errors.ApexError)
    async def apex_error(request: Request, exc: errors.ApexError) -> JSONResponse:
        return apex_error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the gateway log")
