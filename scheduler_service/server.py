"""Entry point: `python -m scheduler_service [--address ...] [--worker-address ...]`."""

import asyncio
import logging
from collections.abc import Sequence

from apex_serve import rpc, tracing
from apex_serve.flags import parse_config
from apex_serve.logs import configure_logging
from apex_serve.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.loader import load_cost_model
from scheduler_service.engine_loop import EngineLoop
from scheduler_service.scheduler import Scheduler
from scheduler_service.servicer import SchedulerServicer
from scheduler_service.telemetry.metrics import EngineMetrics
from scheduler_service.telemetry.metrics_server import MetricsServer
from scheduler_service.telemetry.observer import EngineObserver
from scheduler_service.telemetry.spans import IterationSpans
from scheduler_service.worker_client import WorkerClient
from scheduler_service.worker_port import WorkerReplaced

logger = logging.getLogger(__name__)
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


async def serve(config: SchedulerConfig) -> None:
    """Serves until SIGTERM. Raises WorkerReplaced if the gpu_worker came back from a loss as another worker (another
    model or other pools): the process must start anew against it."""
    await rpc.wait_healthy(config.worker_address, timeout_s=300.0)
    worker = WorkerClient(config.worker_address)
    info = await worker.info()
    dropped = await worker.reset()  # the worker may have outlived a scheduler that ran before this one
    if dropped:
        logger.info("reset the worker: it dropped %d requests of a previous scheduler", dropped)
    logger.info("worker %s: %d accelerator and %d CPU KV blocks of %d tokens", info.model_name, info.num_kv_blocks,
                info.num_cpu_kv_blocks, info.block_size)
    scheduler = Scheduler(config, info, await load_cost_model(config, info))
    tracer = tracing.tracer(__name__)
    metrics = EngineMetrics(scheduler)  # answered by GetMetrics; on its own port too when metrics_address is set
    observer = EngineObserver(metrics, IterationSpans(tracer) if tracer is not None else None)
    metrics_server = MetricsServer(metrics.registry, config.metrics_address) if config.metrics_address else None
    if metrics_server is not None:
        await metrics_server.start()
    server = rpc.create_server()
    service = rpc.ServiceRunner(server, [SERVICE_NAME])
    loop = EngineLoop(scheduler, worker, observer, service)
    loop.start()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(loop, metrics.registry, tracer), server)
    logger.info("listening on %s (policy %s)", rpc.bind(server, config.address), config.policy)

    async def on_stop() -> None:
        await loop.stop()
        await worker.close()
        if metrics_server is not None:
            await metrics_server.stop()

    await service.run(on_stop=on_stop)
    if loop.failure is not None:
        raise loop.failure


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging("scheduler")
    tracing.setup("scheduler_service")
    try:
        asyncio.run(serve(parse_config(SchedulerConfig, argv, "apex-serve scheduler_service")))
    except WorkerReplaced:  # logged by the engine loop; a supervisor starts the scheduler anew
        raise SystemExit(1) from None
