"""Entry point: `python -m cpu_attention_worker [--address ...]`. Needs no torch."""

import asyncio
import logging
from collections.abc import Sequence

import grpc

from apex_serve import rpc, tracing
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import cpu_attention_pb2, cpu_attention_pb2_grpc
from cpu_attention_worker import shm
from cpu_attention_worker.config import CpuAttentionConfig
from cpu_attention_worker.data_plane_registry import DataPlaneRegistry
from cpu_attention_worker.servicer import CpuAttentionServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = cpu_attention_pb2.DESCRIPTOR.services_by_name["CpuAttentionWorker"].full_name


def create_server(config: CpuAttentionConfig, registry: DataPlaneRegistry) -> grpc.aio.Server:
    server = rpc.create_server()
    cpu_attention_pb2_grpc.add_CpuAttentionWorkerServicer_to_server(CpuAttentionServicer(config, registry), server)
    return server


async def serve(config: CpuAttentionConfig) -> None:
    shm.remove_stale()
    registry = DataPlaneRegistry(config)
    server = create_server(config, registry)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    logger.info("listening on %s", rpc.bind(server, config.address))
    try:
        await service.run()
    finally:
        registry.teardown()


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("cpu_attention_worker")
    tracing.setup("cpu_attention_worker")
    asyncio.run(serve(parse_config(CpuAttentionConfig, argv, "apex-serve cpu_attention_worker")))
