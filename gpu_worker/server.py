"""Entry point: `python -m gpu_worker --model-dir DIR [--address unix:///...]`."""

import asyncio
import logging
from collections.abc import Sequence

from apex_serve import rpc, tracing
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from gpu_worker.config import GpuWorkerConfig
from gpu_worker.model_runner import ModelRunner
from gpu_worker.servicer import GpuWorkerServicer

logger = logging.getLogger(__name__)
SERVICE_NAME = gpu_worker_pb2.DESCRIPTOR.services_by_name["GpuWorker"].full_name


async def serve(config: GpuWorkerConfig) -> None:
    runner = ModelRunner(config)
    info = runner.info
    logger.info(
        "model %s on %s (%s): %d KV blocks of %d tokens, max_model_len %d",
        info.model_name, info.device, info.dtype, info.num_kv_blocks, info.block_size, info.max_model_len,
    )
    server = rpc.create_server()
    gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(GpuWorkerServicer(runner), server)
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    address = rpc.bind(server, config.address)
    logger.info("listening on %s", address)
    try:
        await service.run()
    finally:
        runner.close()


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("gpu_worker")
    tracing.setup("gpu_worker")
    asyncio.run(serve(parse_config(GpuWorkerConfig, argv, "apex-serve gpu_worker")))
