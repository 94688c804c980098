"""GET /health (200 while a scheduler replica is SERVING, else 503) and GET /metrics (Prometheus text); both
stay open when API keys are configured, as load balancers and scrapers expect."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gateway.http_api.dependencies import GeneratorDep, MetricsDep
from gateway.http_api.errors import error_response

router = APIRouter()


@router.get("/health")
async def health(gen: GeneratorDep) -> JSONResponse:
    if not await gen.ready():
        return error_response(503, "no scheduler replica is SERVING")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=metrics.content_type)
