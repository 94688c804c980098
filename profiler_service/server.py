"""Entry point: `python -m profiler_service [--address ...] [--gpu-worker-address ...] [--cpu-worker-address ...]`."""

import asyncio
import logging
from collections.abc import Sequence

from apex_serve import rpc, tracing
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from profiler_service.config import ProfilerConfig
from profiler_service.servicer import ProfilerServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name


async def serve(config: ProfilerConfig) -> None:
    server = rpc.create_server()
    servicer = ProfilerServicer(config)
    profiler_pb2_grpc.add_ProfilerServicer_to_server(servicer, server)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    logger.info("listening on %s", rpc.bind(server, config.address))
    await service.run(on_stop=servicer.close)


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("profiler")
    tracing.setup("profiler_service")
    asyncio.run(serve(parse_config(ProfilerConfig, argv, "apex-serve profiler_service")))
