"""grpc.health.v1 needs no token, so what a caller can make it hold is bounded: name length, open Watches."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.server.core.artifact import MAX_NAME_LENGTH
from nextchar.server.ops.health import MAX_WATCHES

STATUS = health_pb2.HealthCheckResponse


def test_overlong_service_names_are_refused_by_check_and_watch(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        longest = "x" * MAX_NAME_LENGTH  # a model name could be this long: looked up as usual
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service=longest), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=longest), timeout=5)
        assert next(watch).status == STATUS.SERVICE_UNKNOWN
        watch.cancel()
        # One over, and the audit's 3 MB: INVALID_ARGUMENT naming the field and the limit.
        for size in (MAX_NAME_LENGTH + 1, 3 << 20):
            request = health_pb2.HealthCheckRequest(service="x" * size)
            with pytest.raises(grpc.RpcError) as checked:
                stub.Check(request, timeout=10)
            with pytest.raises(grpc.RpcError) as watched:
                next(stub.Watch(request, timeout=10))
            for e in (checked.value, watched.value):
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, size
                assert e.details() == f"service: must be at most {MAX_NAME_LENGTH} characters, got {size}"
        for service in ("", "nextchar.v1.NextChar", "lstm"):  # probes are unaffected
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == STATUS.SERVING, service


def test_open_watch_calls_are_capped(server) -> None:
    """MAX_WATCHES Watch calls stay open; one more is RESOURCE_EXHAUSTED (Check still answers), and once
    one closes another may open."""

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="lstm")
            calls: list = []
            try:
                # In batches: grpc itself (a bare server with the stock servicer too) now and then
                # cancels one stream of a burst of 1,024 opened at once on one connection.
                for _ in range(0, MAX_WATCHES, 64):
                    batch = [stub.Watch(request, timeout=60) for _ in range(64)]
                    calls += batch
                    firsts = await asyncio.gather(*(call.read() for call in batch))
                    assert {reply.status for reply in firsts} == {STATUS.SERVING}
                assert len(calls) == MAX_WATCHES
                extra = stub.Watch(request, timeout=10)
                calls.append(extra)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await extra.read()
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert f"at most {MAX_WATCHES} health Watch calls" in (e.value.details() or "")
                assert (await stub.Check(request, timeout=5)).status == STATUS.SERVING
                calls[0].cancel()
                # The server sees the cancel a moment after the client: retry (bounded) until a slot is free.
                for _ in range(100):
                    again = stub.Watch(request, timeout=10)
                    calls.append(again)
                    try:
                        assert (await again.read()).status == STATUS.SERVING
                        break
                    except grpc.aio.AioRpcError as refused:
                        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("no Watch slot came free after a Watch was cancelled")
            finally:
                for call in calls:
                    call.cancel()

    asyncio.run(main())
