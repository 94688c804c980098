"""Entry point: `python -m gateway --model-dir DIR [--address host:port] [--scheduler-address ...]`."""

import asyncio
import logging
from collections.abc import Sequence

import grpc

from apex_serve import convert, rpc
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import gateway_pb2, gateway_pb2_grpc, gpu_worker_pb2, scheduler_pb2_grpc
from gateway.config import GatewayConfig
from gateway.servicer import GatewayServicer
from gateway.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


async def serve(config: GatewayConfig) -> None:
    await rpc.wait_healthy(config.scheduler_address, timeout_s=300.0)
    channel = grpc.aio.insecure_channel(config.scheduler_address, options=rpc.CHANNEL_OPTIONS)
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
    worker = convert.worker_info_from_pb(await scheduler.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest()))
    servicer = GatewayServicer(load_tokenizer(config.model_dir), config.served_model_name, worker, scheduler)
    server = rpc.create_server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    address = rpc.bind(server, config.address)
    logger.info("serving model %s on %s", config.served_model_name, address)
    await service.run(grace_s=config.drain_timeout_s, on_stop=channel.close)


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("gateway")
    asyncio.run(serve(parse_config(GatewayConfig, argv, "apex-serve gateway")))
