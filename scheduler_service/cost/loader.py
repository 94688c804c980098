"""The scheduler's cost model for the hybrid policies: the profiler's measured tables for this worker (profiled with
the quick grid first if none are stored), and the model's shapes from the worker's config.json."""

import json
import logging

import grpc

from apex_serve import rpc
from apex_serve.types import WorkerInfo
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from scheduler_service.config import SchedulerConfig
from scheduler_service.cost.model import TableCostModel
from scheduler_service.cost.shape import model_shape_from_config
from scheduler_service.cost.tables import PerformanceTables, describe_ranges

logger = logging.getLogger(__name__)
_KV_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


async def load_cost_model(config: SchedulerConfig, info: WorkerInfo, timeout_s: float = 1800.0
                          ) -> TableCostModel | None:
    """The tables of the profiler at config.profiler_address. The hybrid policies need them: without a stored
    profile, the workers are profiled with the quick grid first. gpu-only only reports its predictions against the
    measured times: it takes a stored profile if there is one (None otherwise, and without a profiler address)."""
    if not config.profiler_address:
        if config.hybrid:
            raise ValueError(f"profiler_address: policy {config.policy!r} predicts with the profiler's tables; "
                             "give the profiler_service's address")
        return None
    if not info.model_config_json:
        raise ValueError("model_config_json: the gpu_worker did not report its model's config.json")
    await rpc.wait_healthy(config.profiler_address, timeout_s=300.0)
    async with rpc.channel(config.profiler_address) as channel:
        stub = profiler_pb2_grpc.ProfilerStub(channel)
        try:
            reply = await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            if not config.hybrid:
                logger.info("no stored profile: gpu-only runs without predictions")
                return None
            logger.info("no stored profile for this worker: profiling it with the quick grid")
            async for progress in stub.Profile(profiler_pb2.ProfileRequest(quick=True), timeout=timeout_s):
                if progress.stage == "done" or progress.done % 20 == 0:
                    logger.info("profile: %s, %d of %d points", progress.stage, progress.done, progress.total)
            reply = await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
    profile = json.loads(reply.tables_json)
    tables = PerformanceTables.from_json(profile)
    shape = model_shape_from_config(json.loads(info.model_config_json), _KV_BYTES.get(info.cpu_kv_dtype))
    caps = {"batch_tokens": config.max_num_batched_tokens, "requests": config.max_num_seqs}
    logger.info("cost model: profile %s, %d layers; %s", reply.key_hash[:12], shape.num_layers,
                "\n".join(describe_ranges(profile.get("ranges", {}), caps)))
    return TableCostModel(tables, shape)
