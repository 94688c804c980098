"""gRPC edge of the cpu_attention_worker (control plane only; the data plane is shared memory):
protobuf to and from domain types here, nowhere else."""

import asyncio
import dataclasses

import grpc

from apex_serve.convert import hardware_to_pb, measure_points_from_pb
from apex_serve.errors import InvalidArgument
from apex_serve.hardware import fingerprint
from apex_serve.v1 import common_pb2, cpu_attention_pb2, cpu_attention_pb2_grpc
from cpu_attention_worker import profiling
from cpu_attention_worker.config import CpuAttentionConfig
from cpu_attention_worker.data_plane import DataPlaneSpec, DataPlaneSpecError
from cpu_attention_worker.data_plane_registry import DataPlane, DataPlaneRegistry
from cpu_attention_worker.kernel import kernel_info


def spec_from_proto(message: cpu_attention_pb2.DataPlaneSpec) -> DataPlaneSpec:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(DataPlaneSpec) if f.name != "num_slots"}
    if message.HasField("num_slots"):
        fields["num_slots"] = message.num_slots
    try:
        return DataPlaneSpec(**fields)
    except DataPlaneSpecError as exc:
        raise InvalidArgument(exc.field, exc.reason) from exc


def spec_to_proto(spec: DataPlaneSpec) -> cpu_attention_pb2.DataPlaneSpec:
    return cpu_attention_pb2.DataPlaneSpec(**dataclasses.asdict(spec))


def layout_to_proto(plane: DataPlane) -> cpu_attention_pb2.DataPlaneLayout:
    reply = cpu_attention_pb2.DataPlaneLayout(spec=spec_to_proto(plane.spec))
    for key, region in plane.regions.items():
        reply.regions.add(name=region.name, nbytes=region.nbytes, key=key)
        for name, tensor in plane.layout[key].tensors.items():
            reply.tensors[name].CopyFrom(common_pb2.TensorRef(
                kind=common_pb2.TENSOR_KIND_SHM, region=region.name, offset=tensor.offset, nbytes=tensor.nbytes,
                dtype=tensor.dtype, shape=tensor.shape,
            ))
    return reply


class CpuAttentionServicer(cpu_attention_pb2_grpc.CpuAttentionWorkerServicer):
    def __init__(self, config: CpuAttentionConfig, registry: DataPlaneRegistry) -> None:
        self._config = config
        self._registry = registry

    async def GetKernelInfo(
        self, request: cpu_attention_pb2.GetKernelInfoRequest, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.KernelInfo:
        info = kernel_info()
        return cpu_attention_pb2.KernelInfo(
            isa=info["isa"], num_threads=self._config.num_threads, dtypes=list(info["dtypes"]),
            hardware=hardware_to_pb(fingerprint()),
        )

    async def Measure(
        self, request: common_pb2.MeasureRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.MeasureResponse:
        ns = await asyncio.to_thread(
            profiling.measure, self._registry.plane, request.table, measure_points_from_pb(request),
            request.warmup, request.repeats, self._config.num_threads,
        )
        return common_pb2.MeasureResponse(median_ns=ns)

    async def SetupDataPlane(
        self, request: cpu_attention_pb2.DataPlaneSpec, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.DataPlaneLayout:
        return layout_to_proto(self._registry.setup(spec_from_proto(request)))

    async def RegionStatus(
        self, request: cpu_attention_pb2.RegionStatusRequest, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.RegionStatusResponse:
        regions = self._registry.status(request.name if request.HasField("name") else None)
        return cpu_attention_pb2.RegionStatusResponse(
            regions=[cpu_attention_pb2.SharedMemoryRegion(name=name, nbytes=nbytes) for name, nbytes in regions]
        )

    async def UnregisterRegion(
        self, request: cpu_attention_pb2.UnregisterRegionRequest, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.UnregisterRegionResponse:
        self._registry.unregister(request.name)
        return cpu_attention_pb2.UnregisterRegionResponse()

    async def TeardownDataPlane(
        self, request: cpu_attention_pb2.TeardownDataPlaneRequest, context: grpc.aio.ServicerContext
    ) -> cpu_attention_pb2.TeardownDataPlaneResponse:
        self._registry.teardown()
        return cpu_attention_pb2.TeardownDataPlaneResponse()
