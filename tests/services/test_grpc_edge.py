"""What every service answers at its gRPC edge, over a real in-process server: UNIMPLEMENTED for a method without
a body (no ERROR log), grpc.health.v1 List, and server reflection on both v1 and v1alpha."""

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from apex_serve import rpc
from apex_serve.v1 import profiler_pb2, profiler_pb2_grpc

SERVICE = profiler_pb2.DESCRIPTOR.services_by_name["Profiler"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LISTED = {SERVICE, HEALTH, "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture
async def address() -> AsyncIterator[str]:
    """A server whose Profiler service is the generated base class: every method raises NotImplementedError."""
    server = rpc.create_server()
    profiler_pb2_grpc.add_ProfilerServicer_to_server(profiler_pb2_grpc.ProfilerServicer(), server)
    runner = rpc.ServiceRunner(server, [SERVICE])
    bound = rpc.bind(server, "127.0.0.1:0")
    await server.start()
    await runner.set_serving(True)
    yield bound
    await server.stop(None)


async def test_an_unimplemented_method_answers_unimplemented_without_an_error_log(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=rpc.__name__)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = profiler_pb2_grpc.ProfilerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.GetPerformanceModel(profiler_pb2.GetPerformanceModelRequest())
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.Profile(profiler_pb2.ProfileRequest()):
                pass
    assert unary.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stream.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]
    assert any("GetPerformanceModel" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_health_list_reports_every_service(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5.0)
    assert set(reply.statuses) == {"", SERVICE}
    assert {s.status for s in reply.statuses.values()} == {health_pb2.HealthCheckResponse.SERVING}


async def _list_services(channel: grpc.aio.Channel, method: str) -> set[str]:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = [r async for r in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5.0)]
    return {s.name for r in replies for s in r.list_services_response.service}


async def test_reflection_v1_and_v1alpha_list_the_same_services(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        v1 = await _list_services(channel, f"/{rpc.REFLECTION_V1_SERVICE}/ServerReflectionInfo")
        v1alpha = await _list_services(channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert v1 == v1alpha == LISTED


async def test_reflection_v1_resolves_a_listed_service_to_its_file(address: str) -> None:
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/{rpc.REFLECTION_V1_SERVICE}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = [r async for r in call(iter([request]), timeout=5.0)]
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    assert reply.file_descriptor_response.file_descriptor_proto


def _resolve_listed_services(address: str) -> dict[str, str]:
    """Each service the v1alpha reflection client lists, with the file it resolves to (a blocking client)."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        return {name: database.FindFileContainingSymbol(name).name for name in database.get_services()}


async def test_every_listed_service_resolves_through_the_v1alpha_client(address: str) -> None:
    files = await asyncio.to_thread(_resolve_listed_services, address)
    assert set(files) == LISTED
    assert files[SERVICE] == "apex_serve/v1/profiler.proto"
