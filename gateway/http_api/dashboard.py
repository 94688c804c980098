"""GET /dashboard: a live overlap dashboard (one self-contained page, no external resources), and
GET /dashboard/data: the JSON it polls every second. The page is open; its data needs an API key the
way /v1 does when keys are configured: the page sends `authorization: Bearer <key>` with the key from
the URL fragment (`/dashboard#key=K`, which never reaches the server or its logs) or from a field it
shows on 401, and keeps it for the browser tab (sessionStorage)."""

import time
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse

from gateway.http_api.dashboard_data import replica_json
from gateway.http_api.dependencies import GeneratorDep, require_api_key

router = APIRouter()

_PAGE = resources.files("gateway.http_api").joinpath("dashboard.html").read_text(encoding="utf-8")
# Inline script and style only; data from this origin only; nothing else may load.
_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"


@router.get("/dashboard", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers={"content-security-policy": _CSP, "cache-control": "no-cache"})


@router.get("/dashboard/data", dependencies=[Depends(require_api_key)], include_in_schema=False)
async def data(gen: GeneratorDep) -> JSONResponse:
    snapshots = await gen.replicas.snapshot()
    return JSONResponse(
        {
            "model": gen.model_name,
            "time_unix_s": time.time(),
            "replicas": [replica_json(s) for s in snapshots],
        },
        headers={"cache-control": "no-store"},
    )
