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


def test_a_call_past_its_deadline_keeps_its_share_while_the_model_still_works_for_it(make_server) -> None:
    """PredictNext runs on a worker thread that cannot be stopped: a caller whose deadline passed keeps
    its per-client slot (and its --max-concurrent slot) until that work ends, so deadlines are no way
    around --max-per-client."""
    import threading
    import time

    server = make_server(max_concurrent=8, max_per_client=1)
    model = server.server.servicer.registry.cached("lstm")
    step, release = model.engine.step, threading.Event()

    def slow_step(*args, **kwargs):  # the model at work for a while (bounded)
        release.wait(10)
        return step(*args, **kwargs)

    model.engine.step = slow_step
    request = pb.PredictNextRequest(model=pb.ModelRef(name="lstm"), context="O say", n=3)
    who = (("x-forwarded-for", "10.0.0.3"),)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.NextCharStub(channel)
            with pytest.raises(grpc.RpcError) as late:
                stub.PredictNext(request, timeout=0.2, metadata=who)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Letting go took the server a few ms after the deadline; the model works on for seconds.
            time.sleep(1.0)
            assert server.runner.in_flight == 1  # the model still works for it
            with pytest.raises(grpc.RpcError) as refused:
                stub.PredictNext(request, timeout=5, metadata=who)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            wait_until(lambda: server.runner.in_flight == 0, 10, "the late call's work to end")
            assert len(stub.PredictNext(request, timeout=10, metadata=who).predictions) == 3
    finally:
        release.set()
        model.engine.step = step
