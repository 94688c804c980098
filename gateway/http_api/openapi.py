"""The OpenAPI document served at /openapi.json, true to what the server answers: invalid input is a 400 in
OpenAI's error shape (errors.py), never FastAPI's 422, so the 422 responses and their schemas are left out; each
route declares the statuses it answers with (`responses=`). The chunks of a chat stream, which no route returns
whole, are added to the components for the streams' event schemas to refer to."""

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from gateway.http_api.responses import ChatCompletionChunk

_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_STREAM_CHUNKS = (ChatCompletionChunk,)


def install_openapi(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = true_to_the_server(build())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def true_to_the_server(document: dict[str, Any]) -> dict[str, Any]:
    for methods in document.get("paths", {}).values():
        for operation in methods.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    _, chunks = models_json_schema(
        [(model, "serialization") for model in _STREAM_CHUNKS], ref_template="#/components/schemas/{model}"
    )
    for name, schema in chunks.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return document
