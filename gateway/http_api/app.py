"""The FastAPI app of the OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models and vLLM's
/tokenize and /detokenize (each behind the API key when keys are configured), /health, /ping, /version, /metrics,
/openapi.json, and the /dashboard page with its data (the data behind the API key too)."""

import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apex_serve import __version__
from gateway.config import GatewayConfig
from gateway.drain import Drain
from gateway.generation import Generator
from gateway.http_api import (
    chat,
    completions,
    dashboard,
    model_list,
    probes,
    tokenization,
)
from gateway.http_api.errors import error_response, install_error_handlers
from gateway.http_api.hosts import HostCheck, allowed_hosts
from gateway.http_api.metrics import HttpMetrics, RequestCounter
from gateway.http_api.openapi import install_openapi


def create_app(generator: Generator, config: GatewayConfig) -> FastAPI:
    app = FastAPI(
        title="apex-serve", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
    )
    app.state.generator = generator
    app.state.drain = Drain()  # HttpServer.stop cuts the streams still running when the drain ends
    app.state.api_keys = config.api_key_set
    app.state.metrics = HttpMetrics(generator)
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    hosts = allowed_hosts(config.allowed_host_set, config.http_address)
    if hosts is not None:
        app.add_middleware(HostCheck, allowed=hosts)
    routers = (completions.router, chat.router, model_list.router, tokenization.router, probes.router, dashboard.router)
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=config.max_message_bytes)
    install_openapi(app)
    return app


class BodyLimit:
    """A body past max_bytes is answered 413 in OpenAI's error shape: at once when its Content-Length says so,
    else as soon as the bytes read pass it (the app then sees the client gone, and its answer is dropped)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(int(length), scope, receive, send)
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes and not started:
                refused = True
                await self._refuse(received, scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracked_send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body: {size} bytes or more exceeds the limit of {self.max_bytes} bytes " \
                  "(8 x max_prompt_bytes + 1 MiB)"
        await error_response(413, message, headers={"connection": "close"})(scope, receive, send)
