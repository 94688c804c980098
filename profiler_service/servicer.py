"""gRPC edge of the profiler. It holds its place: no tables exist yet, and it says so."""

import grpc

from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc

_NOT_YET = "profiling is not implemented in this version; no performance tables exist"


class ProfilerServicer(profiler_pb2_grpc.ProfilerServicer):
    async def Profile(
        self, request: profiler_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    async def GetPerformanceModel(
        self, request: profiler_pb2.GetPerformanceModelRequest, context: grpc.aio.ServicerContext
    ) -> profiler_pb2.PerformanceModel:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)
