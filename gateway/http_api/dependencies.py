"""What the routes get injected: the Generator, the metrics, and the API key check."""

from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from gateway.auth import UNAUTHENTICATED_MESSAGE, key_accepted
from gateway.generation import Generator
from gateway.http_api.metrics import HttpMetrics


def _generator(request: Request) -> Generator:
    return request.app.state.generator


def _metrics(request: Request) -> HttpMetrics:
    return request.app.state.metrics


def require_api_key(request: Request) -> None:
    """401 unless no keys are configured or the bearer header carries one of them."""
    if not key_accepted(request.app.state.api_keys, request.headers.get("authorization")):
        raise HTTPException(401, UNAUTHENTICATED_MESSAGE, headers={"www-authenticate": "Bearer"})


GeneratorDep = Annotated[Generator, Depends(_generator)]
MetricsDep = Annotated[HttpMetrics, Depends(_metrics)]
