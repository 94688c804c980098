"""Entry point: `python -m profiler_service [--address ...]`.

It answers health and reflection; Profile and GetPerformanceModel answer UNIMPLEMENTED until
the profiler issue fills them in."""

import asyncio
import logging
from collections.abc import Sequence

from apex_serve import rpc
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from profiler_service.config import ProfilerConfig
from profiler_service.servicer import ProfilerServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name


async def serve(config: ProfilerConfig) -> None:
    server = rpc.create_server()
    profiler_pb2_grpc.add_ProfilerServicer_to_server(ProfilerServicer(), server)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    logger.info("listening on %s", rpc.bind(server, config.address))
    await service.run()


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("profiler")
    asyncio.run(serve(parse_config(ProfilerConfig, argv, "apex-serve profiler_service")))
