"""A real gpu_worker (a ModelRunner behind GpuWorkerServicer) served over gRPC on a Unix socket, for tests."""

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from apex_serve import rpc
from apex_serve.v1 import gpu_worker_pb2_grpc
from gpu_worker.model_runner import ModelRunner
from gpu_worker.servicer import GpuWorkerServicer


@asynccontextmanager
async def worker_server(runner: ModelRunner) -> AsyncIterator[str]:
    """The runner served; its address. On exit the server stops, the runner closes and the socket's directory goes."""
    server = rpc.create_server()
    gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(GpuWorkerServicer(runner), server)
    run_dir = tempfile.mkdtemp(prefix="apex-", dir="/tmp")  # short: a socket path has a length limit
    address = rpc.bind(server, rpc.unix_address(run_dir, "gpu_worker"))
    await server.start()
    try:
        yield address
    finally:
        await server.stop(None)
        runner.close()
        shutil.rmtree(run_dir)
