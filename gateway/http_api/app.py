"""The FastAPI app of the OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models and vLLM's
/tokenize and /detokenize (each behind the API key when keys are configured), /health, /ping, /version, /metrics,
/openapi.json, and the /dashboard page with its data (the data behind the API key too)."""

import time

from fastapi import FastAPI

from apex_serve import __version__
from gateway.config import GatewayConfig
from gateway.generation import Generator
from gateway.http_api import chat, completions, dashboard, model_list, probes, tokenization
from gateway.http_api.errors import install_error_handlers
from gateway.http_api.metrics import HttpMetrics, RequestCounter
from gateway.http_api.openapi import install_openapi

# Room for JSON escaping (up to 6 bytes a character) of a prompt at the byte bound, which the
# Generator answers with 429; a larger body is refused (413) before it is read into memory.
_BODY_BYTES_PER_PROMPT_BYTE = 8
_BODY_SLACK_BYTES = 1 << 20


def create_app(generator: Generator, config: GatewayConfig) -> FastAPI:
    app = FastAPI(
        title="apex-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
        max_body_size=_BODY_BYTES_PER_PROMPT_BYTE * config.max_prompt_bytes + _BODY_SLACK_BYTES,
    )
    app.state.generator = generator
    app.state.api_keys = config.api_key_set
    app.state.metrics = HttpMetrics(generator)
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    routers = (completions.router, chat.router, model_list.router, tokenization.router, probes.router, dashboard.router)
    for router in routers:
        app.include_router(router)
    install_openapi(app)
    return app
