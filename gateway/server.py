"""Entry point: `python -m gateway --model-dir DIR [--address host:port] [--http-address host:port]
[--scheduler-address A[,B...]] ...`."""

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc

from apex_serve import rpc, tracing
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.auth import ApiKeyInterceptor
from gateway.config import GatewayConfig
from gateway.drain import CUT_GRACE_S
from gateway.generation import Generator
from gateway.replicas import ReplicaMismatch, Replicas
from gateway.servicer import GatewayServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


def _tls(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    key, cert = Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)])


def create_server(config: GatewayConfig) -> grpc.aio.Server:
    """The public gRPC server: API keys checked when configured, request messages bounded by max_message_bytes."""
    return rpc.create_server([ApiKeyInterceptor(config.api_key_set)], config.max_message_bytes)


async def serve(config: GatewayConfig) -> None:
    replicas, worker = await Replicas.connect(
        config.scheduler_addresses, config.startup_timeout_s, config.unavailable_retry_s
    )
    replicas.watch_progress(config.stall_timeout_s)
    generator = Generator.for_config(config, worker, replicas)
    server = create_server(config)
    servicer = GatewayServicer(generator)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    address = rpc.bind(server, config.address, _tls(config))
    logger.info(
        "serving model %s: gRPC on %s%s%s; %d scheduler replica(s): %s", config.served_model_name, address,
        " (TLS)" if config.tls_cert_file else "", " (API keys required)" if config.api_key_set else "",
        len(replicas.replicas), ", ".join(config.scheduler_addresses),
    )
    http = None
    if config.http_address:
        from gateway.http_api.server import HttpServer  # FastAPI is loaded only when HTTP is on

        http = HttpServer(generator, config)
        await http.start()
        logger.info("OpenAI-compatible HTTP on http://%s/v1, dashboard on /dashboard", config.http_address)

    async def drain() -> None:
        """Beside the gRPC server's own drain: HTTP's, and the cut of the Generate streams past drain_timeout_s."""
        cut = asyncio.create_task(servicer.drain.cut_after(config.drain_timeout_s), name="grpc drain")
        if http is not None:
            await http.stop()
        await servicer.drain.idle()
        cut.cancel()

    await service.run(grace_s=config.drain_timeout_s + CUT_GRACE_S, on_stop=replicas.close, drain_alongside=drain)


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("gateway")
    tracing.setup("gateway")
    try:
        config = parse_config(GatewayConfig, argv, "apex-serve gateway")
    except ValueError as exc:
        logger.error("not starting: %s", exc)
        raise SystemExit(2) from exc
    try:
        asyncio.run(serve(config))
    except (ReplicaMismatch, TimeoutError) as exc:
        logger.error("not starting: %s", exc)
        raise SystemExit(1) from exc
