"""Streams: live and coalesced; cancelled and deadline-bound work stops; graceful drain on shutdown."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import best_stop_latency, wait_until

from nextchar.client.client import NextCharClient
from nextchar.client.errors import Cancelled, DeadlineExceeded, Unavailable
from nextchar.server.core.generation import FinishReason
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

LONG = 100_000  # far more than a test ever waits for: if one of these ran to the end, the test would hang


@pytest.fixture(scope="module", params=["auto", "off"])
def long_server(make_server, request):
    """Every test here runs against the default (fp32 models batched) and the one-thread-per-stream path."""
    return make_server(max_new_chars=LONG, grace_seconds=30.0, batching=request.param)


def _new_track(server, before: int):
    """The track of the generation started after `before` tracks existed."""
    wait_until(lambda: server.tracks and server.tracks[-1].id > before, 10, "the generation to start",
               interval=0.001)
    return server.tracks[-1]


def _wait_finished(track) -> None:
    wait_until(lambda: track.finished_at is not None, 10, "the generation to stop", interval=0.001)


def test_stream_is_live_and_coalesced(long_server) -> None:
    """The first text arrives while generation is still running; messages carry several chars each."""
    before = long_server.tracks[-1].id if long_server.tracks else 0
    with grpc.insecure_channel(long_server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=3000,
                                     temperature=1.0, seed=5)
        messages = stub.GenerateStream(request, timeout=60)
        first = next(messages)
        track = _new_track(long_server, before)
        assert first.text and track.steps < 3000  # live: generation was still going
        rest = list(messages)
    texts = [first.text] + [m.text for m in rest[:-1]]
    assert rest[-1].HasField("summary") and rest[-1].summary.usage.generated_chars == 3000
    assert sum(map(len, texts)) == 3000
    assert 1 < len(texts) < 3000  # coalesced, yet more than one lump


def _cancel_one(server) -> float:
    """Start a long stream, cancel it after 5 messages; seconds from the cancel to the server's stop."""
    runner = server.runner
    cancelled_before = runner.cancelled_streams
    before = server.tracks[-1].id if server.tracks else 0
    with NextCharClient(server.address, timeout=60) as c:
        stream = c.generate_stream("lstm", "O say", LONG, temperature=1.0)
        pieces = iter(stream)
        received = "".join(next(pieces) for _ in range(5))
        track = _new_track(server, before)
        steps_at_cancel = track.steps
        cancelled_at = time.perf_counter()  # the runner's clock is time.perf_counter too
        stream.cancel()
        _wait_finished(track)
    assert received
    assert track.reason is FinishReason.CANCELLED
    assert steps_at_cancel <= track.steps < LONG
    assert runner.cancelled_streams == cancelled_before + 1
    return track.finished_at - cancelled_at


def test_cancelling_a_stream_stops_generation_within_100ms(long_server) -> None:
    latencies = best_stop_latency(lambda: _cancel_one(long_server), 0.100)
    assert min(latencies) < 0.100, f"generation stopped {latencies} s after the cancel"


def test_a_cancel_stops_within_100ms_while_64_streams_run(make_server) -> None:
    """K chars per engine call must not delay a cancel: calls are cut to about --max-call-ms.
    (The default server: 64 streams share one batcher.)"""
    server = make_server(max_new_chars=LONG, grace_seconds=30.0)
    with NextCharClient(server.address, timeout=60) as c:
        others = [c.generate_stream("lstm", "O say", LONG, temperature=1.0, seed=i) for i in range(63)]
        try:
            for s in others:
                assert next(iter(s))  # all running
            latencies = best_stop_latency(lambda: _cancel_one(server), 0.100)
        finally:
            for s in others:
                s.cancel()
    assert min(latencies) < 0.100, f"generation stopped {latencies} s after the cancel"




@pytest.mark.parametrize("rpc", ["generate", "generate_stream"])
def test_deadline_exceeded_stops_the_work(long_server, rpc: str) -> None:
    before = long_server.tracks[-1].id if long_server.tracks else 0
    with NextCharClient(long_server.address) as c, pytest.raises(DeadlineExceeded):
        if rpc == "generate":
            c.generate("gru", "O say", LONG, temperature=1.0, timeout=0.3)
        else:
            list(c.generate_stream("gru", "O say", LONG, temperature=1.0, timeout=0.3))
    track = _new_track(long_server, before)
    _wait_finished(track)
    assert track.reason in (FinishReason.DEADLINE, FinishReason.CANCELLED)
    assert track.steps < LONG


def test_an_already_expired_deadline(long_server) -> None:
    with NextCharClient(long_server.address) as c:
        with pytest.raises(DeadlineExceeded):
            c.generate("gru", "O say", 2000, timeout=0.0)
        # Not PredictNext: grpc rounds a zero timeout up on the wire and a one-call RPC can finish before
        # the client's own timer fires (~1 in 7 here), so its outcome races by grpc's design.
        with pytest.raises(DeadlineExceeded):
            list(c.generate_stream("gru", "O say", 2000, timeout=0.0))


def test_shutdown_goes_not_serving_refuses_new_calls_and_lets_running_streams_finish(make_server) -> None:
    s = make_server(max_new_chars=LONG, grace_seconds=60.0)
    n = 20_000
    with NextCharClient(s.address, timeout=60) as c, grpc.insecure_channel(s.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stream = c.generate_stream("rnn", "O say", n, temperature=1.0, seed=9)
        pieces = iter(stream)
        first = next(pieces)
        shutdown = s.submit(s.server.shutdown(60.0))
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status != \
                health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert health.Check(health_pb2.HealthCheckRequest(service="rnn"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(Unavailable, match="shutting down"):
            c.generate("rnn", "O say", 5)
        text = first + "".join(pieces)
    assert len(text) == n and stream.summary.finish_reason == "length"
    assert shutdown.result(60) is True  # everything finished within the grace period


def test_calls_still_running_when_the_grace_period_ends_are_cancelled(make_server) -> None:
    s = make_server(max_new_chars=LONG)
    with NextCharClient(s.address, timeout=60) as c:
        stream = c.generate_stream("rnn", "O say", LONG, temperature=1.0)
        pieces = iter(stream)
        next(pieces)
        track = s.tracks[-1]
        assert s.run(s.server.shutdown(0.2)) is False
        with pytest.raises((Unavailable, Cancelled)):
            for _ in pieces:
                pass
    _wait_finished(track)
    assert track.steps < LONG
