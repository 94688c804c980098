"""GET /dashboard: a live overlap dashboard (a page, its script /dashboard/app.js and its style sheet
/dashboard/app.css, nothing from elsewhere), and GET /dashboard/data: the JSON it polls every second. The
page is open; its data needs an API key the way /v1 does when keys are configured: the page sends
`authorization: Bearer <key>` with the key from the URL fragment (`/dashboard#key=K`, which never reaches the
server or its logs) or from a field it shows on 401, and keeps it for the browser tab (sessionStorage)."""

import time
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, JSONResponse, Response

from gateway.http_api.dashboard_data import replica_json
from gateway.http_api.dependencies import GeneratorDep, require_api_key

router = APIRouter()


def _read(name: str) -> str:
    return resources.files("gateway.http_api").joinpath(name).read_text(encoding="utf-8")


_PAGE = _read("dashboard.html")
_SCRIPT = _read("dashboard.js")
_STYLE = _read("dashboard.css")
# Script, style and data from this origin only, nothing inline, nothing else loads; no page may frame it.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


@router.get("/dashboard", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers=_HEADERS)


@router.get("/dashboard/app.js", include_in_schema=False)
async def script() -> Response:
    return Response(_SCRIPT, media_type="text/javascript; charset=utf-8", headers=_HEADERS)


@router.get("/dashboard/app.css", include_in_schema=False)
async def style() -> Response:
    return Response(_STYLE, media_type="text/css; charset=utf-8", headers=_HEADERS)


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
