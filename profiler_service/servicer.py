"""gRPC edge of the profiler: Profile (server-streaming progress) and GetPerformanceModel."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import grpc

from apex_serve.errors import InvalidArgument, NotFound
from apex_serve.types import WorkerInfo
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from profiler_service.config import ProfilerConfig
from profiler_service.grid import Grid, default_grid
from profiler_service.job import Workers, profile_key, run_profile
from profiler_service.ranges import table_ranges
from profiler_service.store import ProfileStore, key_hash

logger = logging.getLogger(__name__)


def grid_from_pb(msg: profiler_pb2.ProfileGrid) -> Grid:
    return Grid(**{field.name: tuple(getattr(msg, field.name)) for field in msg.DESCRIPTOR.fields})


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    def __init__(self, config: ProfilerConfig) -> None:
        self._config = config
        self._store = ProfileStore(config.profile_dir)
        self._workers = Workers(config.gpu_worker_address, config.cpu_worker_address)
        self._lock = asyncio.Lock()  # one job at a time: jobs would time each other

    async def close(self) -> None:
        await self._workers.close()

    async def _current(self, model: str) -> tuple[WorkerInfo, dict]:
        info, cpu_hardware = await self._workers.describe()
        if model and model != info.model_name:
            raise InvalidArgument("model", f"{model!r} is not served here; the gpu_worker serves {info.model_name!r}")
        return info, profile_key(info, cpu_hardware)

    async def Profile(
        self, request: profiler_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[profiler_pb2.ProfileProgress]:
        info, key = await self._current(request.model)
        grid = grid_from_pb(request.grid) if request.HasField("grid") else default_grid(info, request.quick)
        digest = key_hash(key)
        if not request.force and self._store.load(key) is not None:
            path = str(self._store.path(key))
            logger.info("profile %s is stored at %s: reused", digest, path)
            yield profiler_pb2.ProfileProgress(stage="reused", key_hash=digest, path=path)
            return
        async with self._lock:
            tables: dict = {}
            async for progress in run_profile(
                self._workers, info, grid, key, self._config.warmup, self._config.repeats, tables
            ):
                if progress.stage == "done":
                    meta = tables.pop("__meta__")
                    ranges = table_ranges(tables, info)
                    path = str(self._store.save({**meta, "grid": grid.__dict__, "ranges": ranges, "tables": tables}))
                    logger.info("profile %s stored at %s", digest, path)
                    yield profiler_pb2.ProfileProgress(
                        stage="done", done=progress.done, total=progress.total, key_hash=digest, path=path
                    )
                else:
                    yield profiler_pb2.ProfileProgress(
                        stage=progress.stage, done=progress.done, total=progress.total, key_hash=digest
                    )

    async def GetPerformanceModel(
        self, request: profiler_pb2.GetPerformanceModelRequest, context: grpc.aio.ServicerContext
    ) -> profiler_pb2.PerformanceModel:
        """The stored profile of the current key; its ranges are those of the live workers (a profile's key does not
        hold the pools' sizes, so one profile serves pools of any size)."""
        info, key = await self._current(request.model)
        profile = self._store.load(key)
        if profile is None:
            raise NotFound(f"no profile for the current key {key_hash(key)}: run Profile first")
        profile["ranges"] = table_ranges(profile["tables"], info)
        return profiler_pb2.PerformanceModel(key_hash=key_hash(key), tables_json=json.dumps(profile))
