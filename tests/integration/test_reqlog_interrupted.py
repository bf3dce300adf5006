"""The request log and metrics tell the truth about interrupted streams (issue 13.6): the characters
delivered, DEADLINE_EXCEEDED for a stream that ran out its deadline, CANCELLED for one the caller left."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from server_harness import wait_until

from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

LONG = 100_000


def _requests(metrics, code: str) -> float:
    return metrics.requests.labels("GenerateStream", "lstm", code)._value.get()


def _generated(metrics) -> float:
    return metrics.generated_chars.labels("lstm")._value.get()


def _lines(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "nextchar.requests" and hasattr(r, "fields")]


@pytest.fixture
def streaming_server(make_server):
    return make_server(max_new_chars=LONG)


def test_a_cancelled_stream_logs_what_it_delivered(streaming_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="nextchar.requests")
    metrics = streaming_server.server.ops.metrics
    cancelled, chars = _requests(metrics, "CANCELLED"), _generated(metrics)
    with grpc.insecure_channel(streaming_server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        call = stub.GenerateStream(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                      max_new_chars=LONG), timeout=60)
        received = 0
        for message in call:
            received += len(message.text)
            if received >= 2000:
                break
        call.cancel()
    wait_until(lambda: _requests(metrics, "CANCELLED") > cancelled, 10, "the cancelled call's record")
    [line] = [f for f in _lines(caplog) if f["method"] == "GenerateStream"]
    assert line["code"] == "CANCELLED"
    assert line["chars"] >= received  # at least what the client read; never 0
    assert _generated(metrics) - chars == line["chars"]


def test_a_stream_past_its_deadline_logs_deadline_exceeded(streaming_server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="nextchar.requests")
    metrics = streaming_server.server.ops.metrics
    before = _requests(metrics, "DEADLINE_EXCEEDED")
    with grpc.insecure_channel(streaming_server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        call = stub.GenerateStream(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                      max_new_chars=LONG), timeout=0.5)
        received = 0
        with pytest.raises(grpc.RpcError) as e:
            for message in call:
                received += len(message.text)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _requests(metrics, "DEADLINE_EXCEEDED") > before, 10, "the late call's record")
    [line] = [f for f in _lines(caplog) if f["method"] == "GenerateStream"]
    assert line["code"] == "DEADLINE_EXCEEDED" and line["chars"] >= received > 0


def test_a_reply_that_could_not_be_sent_is_not_logged_ok(streaming_server, caplog) -> None:
    """Generate (unary) whose caller is gone before the reply: CANCELLED, not OK."""
    caplog.set_level(logging.INFO, logger="nextchar.requests")
    metrics = streaming_server.server.ops.metrics
    before = metrics.requests.labels("Generate", "lstm", "CANCELLED")._value.get()
    with grpc.insecure_channel(streaming_server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        future = stub.Generate.future(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                         max_new_chars=20_000), timeout=60)
        time.sleep(0.3)
        future.cancel()
    wait_until(lambda: metrics.requests.labels("Generate", "lstm", "CANCELLED")._value.get() > before, 20,
               "the abandoned call's record")
    [line] = [f for f in _lines(caplog) if f["method"] == "Generate"]
    assert line["code"] == "CANCELLED"


class _GoneContext:
    """A call whose caller left while the handler was finishing: gRPC could not send the reply."""

    def invocation_metadata(self):
        return ()

    def cancelled(self) -> bool:
        return True

    def time_remaining(self) -> float:
        return 5.0


class _NoModels:
    def names(self) -> list[str]:
        return []


def test_a_handler_that_returned_after_its_caller_left_is_not_ok(caplog) -> None:
    import asyncio

    from nextchar.server.ops.metrics import Metrics
    from nextchar.server.ops.reqlog import ObservingInterceptor

    caplog.set_level(logging.INFO, logger="nextchar.requests")
    metrics = Metrics()
    interceptor = ObservingInterceptor(metrics, _NoModels(), log_prompts=False)

    async def behavior(request, context):
        return pb.GenerateResponse(text="abc")

    unary = interceptor._unary("/nextchar.v1.NextChar/Generate", behavior)
    asyncio.run(unary(pb.GenerateRequest(), _GoneContext()))
    [line] = _lines(caplog)
    assert line["code"] == "CANCELLED"
    assert metrics.requests.labels("Generate", "", "CANCELLED")._value.get() == 1


class _JustBeforeDeadline(_GoneContext):
    """The client's deadline ran out and cancelled the call a few ms before the server's own."""

    def time_remaining(self) -> float:
        return 0.004


def test_a_cancel_at_the_deadline_is_logged_deadline_exceeded(caplog) -> None:
    import asyncio

    from nextchar.server.ops.metrics import Metrics
    from nextchar.server.ops.reqlog import ObservingInterceptor

    caplog.set_level(logging.INFO, logger="nextchar.requests")
    interceptor = ObservingInterceptor(Metrics(), _NoModels(), log_prompts=False)

    async def behavior(request, context):
        raise asyncio.CancelledError

    unary = interceptor._unary("/nextchar.v1.NextChar/Generate", behavior)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(unary(pb.GenerateRequest(), _JustBeforeDeadline()))
    [line] = _lines(caplog)
    assert line["code"] == "DEADLINE_EXCEEDED"
