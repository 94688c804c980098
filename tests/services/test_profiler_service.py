"""The profiler over real gRPC against real gpu_worker and cpu_attention_worker processes: a profile is measured,
stored atomically, reused across restarts with the same key and redone when the model config changes; bad input
and a worker dying mid-profile fail with clear statuses and leave no table behind."""

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from apex_serve import rpc
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from apex_tools.processes import ServiceGroup
from profiler_service.config import ProfilerConfig
from profiler_service.servicer import ProfilerServicer

TINY_GRID = profiler_pb2.ProfileGrid(
    lin_tokens=[1, 8], pref_tokens=[16], gatt_rows=[1, 2], gatt_kv_tokens=[64, 128], catt_rows=[1, 2],
    catt_kv_tokens=[64, 128], xfer_rows=[1, 2], step_requests=[1, 4], pref_context=[0, 16],
)


class Workers:
    """A cpu_attention_worker and a gpu_worker attached to it, as processes."""

    def __init__(self, run_dir: Path, model_dir: Path) -> None:
        self.cpu_address = rpc.unix_address(run_dir, "cpu")
        self.gpu_address = rpc.unix_address(run_dir, "gpu")
        self.services = ServiceGroup(stop_timeout_s=30.0)
        self.cpu = self.services.spawn("cpu_attention_worker", self.cpu_address, [
            "--address", self.cpu_address, "--kv-budget-bytes", str(16 * 2**20)])
        self.gpu = self.services.spawn("gpu_worker", self.gpu_address, [
            "--model-dir", str(model_dir), "--address", self.gpu_address, "--device", "cpu",
            "--cpu-worker-address", self.cpu_address, "--cpu-max-rows", "4",
        ])

    async def ready(self) -> None:
        await self.services.serving(self.cpu, 60.0)
        await self.services.serving(self.gpu, 120.0)

    def stop(self) -> None:
        self.services.stop_all()


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short folder for Unix sockets (their paths are limited to about 100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="apx-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def workers_for(sockets: Path) -> Iterator:
    started: list[Workers] = []

    def start(model_dir: Path, name: str = "run") -> Workers:
        run_dir = sockets / name
        run_dir.mkdir()
        started.append(Workers(run_dir, model_dir))
        return started[-1]

    yield start
    for workers in started:
        workers.stop()


class Profiler:
    """The profiler service in this process over a Unix socket."""

    def __init__(self, workers: Workers, profile_dir: Path, socket_dir: Path) -> None:
        self.config = ProfilerConfig(
            address=rpc.unix_address(socket_dir, "profiler"), gpu_worker_address=workers.gpu_address,
            cpu_worker_address=workers.cpu_address, profile_dir=str(profile_dir), warmup=0, repeats=1,
        )

    async def __aenter__(self) -> profiler_pb2_grpc.ProfilerStub:
        self.servicer = ProfilerServicer(self.config)
        self.server = rpc.create_server()
        profiler_pb2_grpc.add_ProfilerServicer_to_server(self.servicer, self.server)
        rpc.bind(self.server, self.config.address)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.config.address)
        return profiler_pb2_grpc.ProfilerStub(self.channel)

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(None)
        await self.servicer.close()


async def profile(stub: profiler_pb2_grpc.ProfilerStub, **fields: object) -> list[profiler_pb2.ProfileProgress]:
    stream: AsyncIterator = stub.Profile(profiler_pb2.ProfileRequest(grid=TINY_GRID, **fields))
    return [progress async for progress in stream]


async def test_profile_is_stored_reused_after_a_restart_and_redone_when_the_model_config_changes(
    workers_for, mha_model_dir: Path, tmp_path: Path, sockets: Path
) -> None:
    workers = workers_for(mha_model_dir)
    await workers.ready()
    profiles = tmp_path / "profiles"
    async with Profiler(workers, profiles, sockets) as stub:
        first = await profile(stub)
        model = await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
    assert [p.stage for p in first][-1] == "done" and first[-1].done == first[-1].total == 17
    tables = json.loads(model.tables_json)
    assert set(tables["tables"]) == {"t_lin", "t_pref", "t_gatt", "t_catt", "t_xfer", "t_sync", "t_step"}
    assert tables["num_layers"] == 2 and tables["key"]["cpu_kv_dtype"] == "float32"
    assert tables["tables"]["t_gatt"]["zs"][1][1] > 0 and tables["tables"]["t_lin"]["ys"][1] > 0
    async with Profiler(workers, profiles, sockets) as stub:  # a restarted profiler, the same key
        again = await profile(stub)
    assert [p.stage for p in again] == ["reused"] and again[0].key_hash == first[-1].key_hash
    workers.stop()

    changed = tmp_path / "changed-model"
    shutil.copytree(mha_model_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    workers = workers_for(changed, "changed")
    await workers.ready()
    async with Profiler(workers, profiles, sockets) as stub:
        redone = await profile(stub)
    assert redone[-1].stage == "done" and redone[-1].key_hash != first[-1].key_hash
    assert len(list(profiles.glob("profile-*.json"))) == 2


async def test_unknown_model_and_empty_grid_are_invalid_argument(
    workers_for, mha_model_dir: Path, tmp_path: Path, sockets: Path
) -> None:
    workers = workers_for(mha_model_dir)
    await workers.ready()
    async with Profiler(workers, tmp_path / "profiles", sockets) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await profile(stub, model="no-such-model")
        empty = profiler_pb2.ProfileGrid()
        empty.CopyFrom(TINY_GRID)
        del empty.catt_rows[:]
        with pytest.raises(grpc.aio.AioRpcError) as no_points:
            [p async for p in stub.Profile(profiler_pb2.ProfileRequest(grid=empty))]
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in unknown.value.details()
    assert no_points.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grid.catt_rows" in no_points.value.details()
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_worker_dying_mid_profile_fails_the_job_and_leaves_no_table(
    workers_for, mha_model_dir: Path, tmp_path: Path, sockets: Path
) -> None:
    workers = workers_for(mha_model_dir)
    await workers.ready()
    profiles = tmp_path / "profiles"
    async with Profiler(workers, profiles, sockets) as stub:
        stages = []
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for progress in stub.Profile(profiler_pb2.ProfileRequest(grid=TINY_GRID)):
                stages.append(progress.stage)
                if progress.stage == "t_catt":  # the CPU table is next: its worker dies
                    workers.cpu.process.kill()
                    workers.cpu.process.wait()
    assert "t_lin" in stages and "done" not in stages
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "t_catt" in failed.value.details()
    assert not profiles.exists() or list(profiles.iterdir()) == [], "a half-written table was left behind"
