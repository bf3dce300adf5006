"""One client cannot take every slot (issue 13.5): with --max-per-client, a flooding client is refused
beyond its share while a second client is still served."""

from __future__ import annotations

import grpc
import pytest
from server_harness import wait_until

from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

LONG = 100_000  # characters: a stream that stays open until cancelled


def _stream(stub, who: str):
    request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=LONG)
    return stub.GenerateStream(request, timeout=60, metadata=(("x-forwarded-for", who),))


def test_a_flooding_client_leaves_room_for_another(make_server) -> None:
    server = make_server(max_concurrent=8, max_per_client=3, max_new_chars=LONG)
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        flood = [_stream(stub, "10.0.0.1") for _ in range(3)]
        try:
            for call in flood:
                next(call)  # each of the first three is generating
            refused = _stream(stub, "10.0.0.1")
            with pytest.raises(grpc.RpcError) as e:
                next(refused)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(10.0.0.1)" in e.value.details() and "--max-per-client=3" in e.value.details()
            other = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=5)
            reply = stub.Generate(other, timeout=30, metadata=(("x-forwarded-for", "10.0.0.2"),))
            assert reply.summary.usage.generated_chars == 5  # the second client is served meanwhile
        finally:
            for call in flood:
                call.cancel()
    wait_until(lambda: server.server.servicer.clients.in_flight == {}, 10, "the flood's slots to free")
    reply = stub_again(server.address)  # the first client gets its slots back
    assert reply.summary.usage.generated_chars == 5


def stub_again(address: str) -> pb.GenerateResponse:
    with grpc.insecure_channel(address) as channel:
        request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=5)
        return inference_pb2_grpc.NextCharStub(channel).Generate(
            request, timeout=30, metadata=(("x-forwarded-for", "10.0.0.1"),))
