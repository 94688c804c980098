"""GET /health: 200 while a scheduler replica is SERVING and its engine not stalled, else 503; its status is
"degraded", with a detail naming them, while such a replica has lost its CPU pool and serves on the accelerator only.
GET /metrics: Prometheus text, the gateway's families and every replica's engine families. Both stay open when API
keys are configured, as load balancers and scrapers expect, and both answer HEAD (the status and headers, no body).
vLLM's GET and POST /ping (what /health answers) and GET /version stay open too."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from apex_serve import __version__
from gateway.http_api.dependencies import GeneratorDep, MetricsDep
from gateway.http_api.errors import error_response, error_responses

router = APIRouter()


class Status(BaseModel):
    status: str  # "ok", or "degraded" while a ready replica serves on the accelerator only
    detail: str | None = None  # what is degraded, one "<replica address>: <what>" per replica, "; "-separated


class Version(BaseModel):
    version: str


@router.get("/health", response_model=Status, responses=error_responses(503))
@router.head("/health", response_model=Status, responses=error_responses(503))
async def health(gen: GeneratorDep) -> JSONResponse:
    if not await gen.ready():
        return error_response(503, "no scheduler replica is ready (SERVING, its engine not stalled)")
    if degraded := gen.replicas.degraded:
        detail = "; ".join(f"{r.address}: CPU pool lost, serving on the accelerator only" for r in degraded)
        return JSONResponse({"status": "degraded", "detail": detail})
    return JSONResponse({"status": "ok"})


@router.get("/ping", response_model=Status, responses=error_responses(503))
@router.post("/ping", response_model=Status, responses=error_responses(503))
async def ping(gen: GeneratorDep) -> JSONResponse:
    """vLLM's probe (SageMaker's): what /health answers."""
    return await health(gen)


@router.get("/version")
async def version() -> Version:
    return Version(version=__version__)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(await metrics.exposition(), media_type=metrics.content_type)


@router.head("/metrics", response_class=PlainTextResponse)
async def metrics_head(metrics: MetricsDep) -> Response:
    """What a scraper's probe needs, without asking the replicas."""
    return Response(media_type=metrics.content_type)
