"""Profiling within the pools the workers have: every point of the default grids fits pools from a few blocks up,
a gpu_worker with a 4- or 8-block device pool profiles with the quick grid, and the profile and its summary say
which tables were measured over which range and where serving extrapolates past it."""

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from apex_serve import rpc
from apex_serve.types import WorkerInfo
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc
from apex_tools.processes import ServiceGroup
from apex_tools.profile_cli import summary
from profiler_service.config import ProfilerConfig
from profiler_service.grid import Grid, default_grid
from profiler_service.servicer import ProfilerServicer
from scheduler_service.cost.tables import describe_ranges

BLOCK_SIZE = 16


def worker_info(num_kv_blocks: int, num_cpu_kv_blocks: int, cpu_max_rows: int = 64, max_model_len: int = 2048
                ) -> WorkerInfo:
    return WorkerInfo("m", 4, 258, max_model_len, (1,), BLOCK_SIZE, num_kv_blocks, "cpu", "float32",
                      num_cpu_kv_blocks=num_cpu_kv_blocks, cpu_max_rows=cpu_max_rows)


def fits(rows: int, kv_tokens: int, num_blocks: int) -> bool:
    return rows * math.ceil(kv_tokens / rows / BLOCK_SIZE) <= num_blocks


def assert_pool_axes_fit(rows: tuple[int, ...], kv: tuple[int, ...], num_blocks: int, row_limit: int) -> None:
    misfits = [(r, t) for r in rows for t in kv if not fits(r, t, num_blocks)]
    assert not misfits, f"points that do not fit a pool of {num_blocks} blocks: {misfits}"
    assert max(rows) <= row_limit and min(kv) >= max(rows), (rows, kv)
    if num_blocks >= 2 and row_limit >= 2:
        assert len(rows) >= 2 and len(kv) >= 2, f"a one-point axis makes the table constant along it: {rows}, {kv}"


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("num_kv_blocks", [4, 8, 24, 68, 4096])
def test_every_default_grid_point_fits_the_pools_and_every_axis_has_two_points(num_kv_blocks: int, quick: bool
                                                                               ) -> None:
    for cpu_blocks, cpu_max_rows, max_model_len in ((4 * num_kv_blocks, 64, 2048), (num_kv_blocks, 3, 256)):
        info = worker_info(num_kv_blocks, cpu_blocks, cpu_max_rows, max_model_len)
        grid = default_grid(info, quick)
        assert_pool_axes_fit(grid.gatt_rows, grid.gatt_kv_tokens, num_kv_blocks, num_kv_blocks)
        assert_pool_axes_fit(grid.catt_rows, grid.catt_kv_tokens, cpu_blocks, cpu_max_rows)
        assert max(grid.xfer_rows) <= cpu_max_rows and len(grid.xfer_rows) >= 2
        assert max(grid.pref_tokens) + max(grid.pref_context) <= max_model_len
        assert len(grid.pref_tokens) >= 2 and len(grid.pref_context) >= 2 and grid.pref_context[0] == 0


def test_device_kv_axis_reaches_the_pool_it_profiles() -> None:
    grid = default_grid(worker_info(68, 4096), quick=True)
    assert grid.gatt_kv_tokens[-1] == 64 * BLOCK_SIZE, "t_gatt stops short of what a 68-block pool holds"


def test_ranges_say_where_serving_extrapolates_and_where_the_scheduler_keeps_within() -> None:
    ranges = {"t_lin": [{"axis": "tokens", "measured": [1, 4096], "serving": [1, 20000], "bound": "batch_tokens"}]}
    assert "extrapolated beyond 4,096 up to 20,000" in "\n".join(describe_ranges(ranges))
    assert "covers serving's 1..512" in "\n".join(describe_ranges(ranges, {"batch_tokens": 512}))


@pytest.fixture
def sockets() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="apx-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def profile_small_pool(model_dir: Path, num_kv_blocks: int, sockets: Path, profiles: Path
                             ) -> tuple[list[profiler_pb2.ProfileProgress], dict]:
    """A cpu_attention_worker and a gpu_worker with num_kv_blocks device blocks, profiled with the quick grid."""
    cpu, gpu = rpc.unix_address(sockets, "cpu"), rpc.unix_address(sockets, "gpu")
    with ServiceGroup(stop_timeout_s=30.0) as services:
        started = [services.spawn("cpu_attention_worker", cpu, ["--address", cpu, "--kv-budget-bytes", str(2**20)]),
                   services.spawn("gpu_worker", gpu, [
                       "--model-dir", str(model_dir), "--address", gpu, "--device", "cpu", "--cpu-worker-address", cpu,
                       "--num-kv-blocks", str(num_kv_blocks), "--block-size", str(BLOCK_SIZE), "--cpu-max-rows", "4"])]
        for service in started:
            await services.serving(service, 120.0)
        config = ProfilerConfig(address=rpc.unix_address(sockets, "profiler"), gpu_worker_address=gpu,
                                cpu_worker_address=cpu, profile_dir=str(profiles), warmup=0, repeats=1)
        servicer = ProfilerServicer(config)
        server = rpc.create_server()
        profiler_pb2_grpc.add_ProfilerServicer_to_server(servicer, server)
        rpc.bind(server, config.address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(config.address) as channel:
                stub = profiler_pb2_grpc.ProfilerStub(channel)
                progress = [p async for p in stub.Profile(profiler_pb2.ProfileRequest(quick=True))]
                model = await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
        finally:
            await server.stop(None)
            await servicer.close()
    return progress, json.loads(model.tables_json)


@pytest.mark.parametrize("num_kv_blocks", [4, 8])
async def test_a_device_pool_of_a_few_blocks_profiles_with_the_quick_grid_and_says_what_it_extrapolates(
    num_kv_blocks: int, mha_model_dir: Path, sockets: Path, tmp_path: Path
) -> None:
    progress, profile = await profile_small_pool(mha_model_dir, num_kv_blocks, sockets, tmp_path / "profiles")
    assert progress[-1].stage == "done" and progress[-1].done == progress[-1].total
    grid = Grid(**{name: tuple(values) for name, values in profile["grid"].items()})
    assert max(grid.gatt_kv_tokens) == num_kv_blocks * BLOCK_SIZE, "t_gatt is measured up to the device pool"
    stored = json.loads(Path(progress[-1].path).read_text())
    assert stored["ranges"] == profile["ranges"], "the stored profile records the ranges of the pools it measured"

    gatt_rows, gatt_kv = profile["ranges"]["t_gatt"]
    assert gatt_rows["measured"] == [1, max(grid.gatt_rows)] and gatt_rows["serving"] == [1, num_kv_blocks]
    assert gatt_kv["measured"][1] == gatt_kv["serving"][1] == num_kv_blocks * BLOCK_SIZE
    chunk, context = profile["ranges"]["t_pref"]
    assert chunk["measured"][1] + context["measured"][1] <= 256 and chunk["serving"] == [1, 256]

    text = summary(profile)
    lines = {line.split()[0]: line for line in text.splitlines()[8:]}
    assert f"decode rows 1..{max(grid.gatt_rows)}: extrapolated beyond {max(grid.gatt_rows)} up to " \
           f"{num_kv_blocks}" in lines["t_gatt"], text
    assert f"chunk tokens 16..{max(grid.pref_tokens)}: extrapolated beyond {max(grid.pref_tokens)} up to 256" \
           in lines["t_pref"], text
    assert set(lines) >= {"measured", "t_lin", "t_pref", "t_gatt", "t_catt", "t_xfer", "t_step"}, text
