"""Per-layer transport between gpu_worker and cpu_attention_worker: the shared-memory doorbell (ring, an empty
layer served by the C++ loop of a real cpu_attention_worker process, done) against a gRPC bidirectional-stream
echo between two processes on the same machine, the per-layer transport we rejected (DESIGN §2). Client and
server sit on different cores where the machine has two."""

import asyncio
import queue
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from apex_serve import rpc
from apex_tools.processes import ServiceGroup
from cpu_attention_worker.client import DataPlaneClient
from cpu_attention_worker.data_plane import DataPlaneSpec

ECHO_METHOD = "/apex_tools.bench.Echo/Stream"
PAYLOAD = bytes(64)  # a layer's control message: a few ids and offsets


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "p50_us": statistics.median(ordered) / 1e3,
        "p99_us": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] / 1e3,
    }


def doorbell_round_trips(address: str, iterations: int) -> list[int]:
    """ns of ring -> done of an empty layer, through the cpu_attention_worker at address."""
    spec = DataPlaneSpec(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, num_blocks=16,
                         kv_dtype="float32", max_rows=1, max_blocks_per_row=1)
    client = DataPlaneClient.connect(address, spec)
    try:
        client.write_no_rows(0)
        samples = []
        for _ in range(iterations):
            start = time.perf_counter_ns()
            client.wait(client.ring(0, 0), timeout_s=5.0)
            samples.append(time.perf_counter_ns() - start)
        return samples
    finally:
        client.close()


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def serve_echo(address: str) -> None:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_echo)
    echo = grpc.method_handlers_generic_handler("apex_tools.bench.Echo", {"Stream": handler})
    server.add_generic_rpc_handlers([echo])
    rpc.bind(server, address)
    await server.start()
    await server.wait_for_termination()


def grpc_round_trips(address: str, iterations: int) -> list[int]:
    """ns of one message out and its echo back over a bidirectional stream to a server process."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        outgoing: queue.Queue[bytes | None] = queue.Queue()
        stream = channel.stream_stream(ECHO_METHOD)(iter(outgoing.get, None))
        samples = []
        for _ in range(iterations):
            start = time.perf_counter_ns()
            outgoing.put(PAYLOAD)
            next(stream)
            samples.append(time.perf_counter_ns() - start)
        outgoing.put(None)
        return samples


def measure(cpu_worker_address: str, run_dir: Path, iterations: int, server_cpus: set[int] | None) -> dict:
    """Doorbell and gRPC round trips; the gRPC echo server is started here, on server_cpus (None: not pinned)."""
    doorbell = doorbell_round_trips(cpu_worker_address, iterations)
    echo_address = rpc.unix_address(run_dir, "echo")
    with ServiceGroup(stop_timeout_s=30.0) as services:
        services.spawn("apex_tools.bench.transport", echo_address, [echo_address], server_cpus)
        grpc_samples = grpc_round_trips(echo_address, iterations)
    result = {
        "iterations": iterations, "doorbell": percentiles_us(doorbell), "grpc_stream": percentiles_us(grpc_samples),
    }
    result["p50_ratio"] = result["grpc_stream"]["p50_us"] / result["doorbell"]["p50_us"]
    return result


if __name__ == "__main__":
    asyncio.run(serve_echo(sys.argv[1]))
