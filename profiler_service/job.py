"""One profiling job: asks the gpu_worker and the cpu_attention_worker to time the grid's points table by table,
reports progress, and assembles the tables JSON (per-layer ns; t_step per iteration)."""

import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import grpc

from apex_serve import convert, rpc
from apex_serve.errors import Unavailable
from apex_serve.hardware import HardwareFingerprint
from apex_serve.measurement import TABLE_VERSION
from apex_serve.types import WorkerInfo
from apex_serve.v1 import cpu_attention_pb2, cpu_attention_pb2_grpc, gpu_worker_pb2, gpu_worker_pb2_grpc
from profiler_service.grid import TABLE_FIELDS, Grid

logger = logging.getLogger(__name__)
CPU_TABLES = ("t_catt",)


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int


def profile_key(info: WorkerInfo, cpu_hardware: HardwareFingerprint | None) -> dict:
    """Hardware of both workers, model config, dtypes, block size, code version (in its JSON form)."""
    key = {
        "gpu_worker_hardware": asdict(info.hardware) if info.hardware else None,
        "cpu_worker_hardware": None if cpu_hardware is None else {
            "cpu_model": cpu_hardware.cpu_model, "cpu_count": cpu_hardware.cpu_count, "cpus": list(cpu_hardware.cpus),
        },
        "model_config_hash": info.model_config_hash,
        "dtype": info.dtype,
        "cpu_kv_dtype": info.cpu_kv_dtype,
        "block_size": info.block_size,
        "code_version": importlib.metadata.version("apex-serve"),
        "table_version": TABLE_VERSION,
    }
    return json.loads(json.dumps(key))


class Workers:
    """The two workers' control channels."""

    def __init__(self, gpu_address: str, cpu_address: str) -> None:
        self._gpu_channel = rpc.channel(gpu_address)
        self._cpu_channel = rpc.channel(cpu_address)
        self.gpu = gpu_worker_pb2_grpc.GpuWorkerStub(self._gpu_channel)
        self.cpu = cpu_attention_pb2_grpc.CpuAttentionWorkerStub(self._cpu_channel)

    async def describe(self) -> tuple[WorkerInfo, HardwareFingerprint | None]:
        try:
            info = convert.worker_info_from_pb(await self.gpu.GetWorkerInfo(gpu_worker_pb2.GetWorkerInfoRequest()))
            if not info.num_cpu_kv_blocks:
                return info, None
            kernel = await self.cpu.GetKernelInfo(cpu_attention_pb2.GetKernelInfoRequest())
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"a worker did not answer: {exc.code().name}: {exc.details()}") from exc
        return info, convert.hardware_from_pb(kernel.hardware)

    async def measure(self, table: str, points: list[tuple[int, int]], warmup: int, repeats: int) -> list[float]:
        stub = self.cpu if table in CPU_TABLES else self.gpu
        reply = await stub.Measure(convert.measure_request_to_pb(table, points, warmup, repeats))
        return list(reply.median_ns)

    async def close(self) -> None:
        await self._gpu_channel.close()
        await self._cpu_channel.close()


async def run_profile(
    workers: Workers, info: WorkerInfo, grid: Grid, key: dict, warmup: int, repeats: int, tables_out: dict
) -> AsyncIterator[Progress]:
    """Measure every table (t_catt, t_xfer, t_sync only with a cpu worker) into tables_out, reporting progress."""
    tables = [t for t in TABLE_FIELDS if info.num_cpu_kv_blocks or t not in ("t_catt", "t_xfer", "t_sync")]
    total = sum(len(grid.points(t)) for t in tables)
    done = 0
    for table in tables:
        points = grid.points(table)
        measured: list[float] = []
        for point in points:  # one call per point: progress moves, and a failure names the point
            yield Progress(table, done, total)
            try:
                measured += await workers.measure(table, [point], warmup, repeats)
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"{table} at {point} failed on the worker: {exc.code().name}: {exc.details()}"
                                  ) from exc
            done += 1
        tables_out[table] = _table_json(table, grid, measured, info)
    tables_out["__meta__"] = {"version": TABLE_VERSION, "key": key, "num_layers": info.num_layers}
    yield Progress("done", done, total)


def _table_json(table: str, grid: Grid, ns: list[float], info: WorkerInfo) -> dict:
    fields = TABLE_FIELDS[table]
    if not fields:
        return {"xs": [0], "ys": ns}
    xs = list(getattr(grid, fields[0]))
    if table == "t_xfer":
        xs = [rows * info.bytes_per_cpu_row for rows in xs]
    if len(fields) == 1:
        return {"xs": xs, "ys": ns}
    ys = list(getattr(grid, fields[1]))
    return {"xs": xs, "ys": ys, "zs": [ns[i * len(ys) : (i + 1) * len(ys)] for i in range(len(xs))]}
