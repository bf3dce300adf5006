"""The Open Inference Protocol face within the server's limits: what a caller sends, or leaves unread,
stays inside --memory-budget-mb and --max-message-bytes, against a real server on 127.0.0.1."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from server_harness import wait_until

from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.inference import grpc_service_pb2_grpc

BUDGET_MB = 16  # the smallest --memory-budget-mb
UNREAD_BYTES = 1 << 20  # logits of one unread step response: 3 of them and their copies fit the budget


@pytest.fixture(scope="module")
def tight(make_server):
    return make_server(memory_budget_mb=BUDGET_MB, max_prompt_chars=100_000)


@pytest.fixture(scope="module")
def roomy(make_server):
    """The default --max-message-bytes (4 MiB) and memory budget, with room for long token rows."""
    return make_server(max_prompt_chars=100_000)


def _engine(server):
    return server.server.servicer.registry.cached("lstm").engine


def _step(request_id: str, batch: int, seq: int) -> kpb.ModelInferRequest:
    tokens = np.zeros((batch, seq), dtype=np.int64)
    request = kpb.ModelInferRequest(model_name="lstm.step", id=request_id, inputs=[
        kpb.ModelInferRequest.InferInputTensor(name="tokens", datatype="INT64", shape=[batch, seq])])
    request.raw_input_contents.append(tokens.tobytes())
    return request


def _steps_run(server) -> float:
    metrics = server.server.ops.metrics.registry
    return metrics.get_sample_value("nextchar_engine_step_duration_seconds_count", {"model": "lstm"}) or 0


def _unread(server, channel: grpc.Channel, count: int):
    """A ModelStreamInfer call of `count` step requests, each answered with UNREAD_BYTES of logits, once
    the server has computed them all; nothing read yet."""
    seq = UNREAD_BYTES // (4 * _engine(server).vocab_size)
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    before = _steps_run(server)
    call = stub.ModelStreamInfer(iter([_step(str(i), 1, seq) for i in range(count)]), timeout=60)
    wait_until(lambda: _steps_run(server) >= before + count, 30, f"the server to compute {count} steps")
    return call


def _reserved(server) -> int:
    return server.server.servicer.budget.reserved


# No BDP probing: the client's window stays small, so an unread response cannot be sent whole.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 16 << 20)]


def test_unread_stream_responses_stay_inside_the_memory_budget(tight) -> None:
    """A ModelStreamInfer client that sends step requests and reads nothing: each computed response keeps
    its reservation until gRPC has sent it. (The reservation ended with the model call while the response
    waited in an unbounded queue: 98 -> 772 MiB RSS under a 64 MiB budget, several such streams.)"""
    with grpc.insecure_channel(tight.address, options=SMALL_WINDOW) as channel:
        replies = _unread(tight, channel, 3)
        wait_until(lambda: _reserved(tight) >= 3 * UNREAD_BYTES, 10,
                   f"the unread responses held in the budget (reserved: {_reserved(tight)} bytes)")
        got = sorted((r.error_message, r.infer_response.id, len(r.infer_response.raw_output_contents[0]))
                     for r in replies)  # answered concurrently: in any order
    logits = 4 * _engine(tight).vocab_size * (UNREAD_BYTES // (4 * _engine(tight).vocab_size))
    assert got == [("", str(i), logits) for i in range(3)]
    wait_until(lambda: _reserved(tight) == 0, 10, "the sent responses' reservations to end")


def test_cancelling_a_stream_ends_the_reservations_of_its_unsent_responses(tight) -> None:
    with grpc.insecure_channel(tight.address, options=SMALL_WINDOW) as channel:
        call = _unread(tight, channel, 3)
        wait_until(lambda: _reserved(tight) >= 3 * UNREAD_BYTES, 10, "the unread responses held")
        call.cancel()
        wait_until(lambda: _reserved(tight) == 0, 10,
                   f"the cancelled stream's reservations to end (reserved: {_reserved(tight)} bytes)")


def _refusal(stub, request: kpb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=60)
    return refused.value


def test_a_step_whose_response_would_pass_the_message_limit_is_refused_before_it_runs(roomy) -> None:
    """--max-message-bytes (4 MiB here) bounds what a response may carry: a step whose logits would
    not fit is INVALID_ARGUMENT naming tokens and the seq (or batch) that fits, and nothing is computed.
    (The model ran, built the response, and gRPC then failed the call, or the whole ModelStreamInfer
    stream, with RESOURCE_EXHAUSTED 'Sent message larger than max'.)"""
    options = [("grpc.max_receive_message_length", 16 << 20)]
    with grpc.insecure_channel(roomy.address, options=options) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        before = _steps_run(roomy)
        error = _refusal(stub, _step("big", 1, 100_000))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().startswith("tokens: shape [1, 100000] asks for "), error.details()
        assert "--max-message-bytes" in error.details()
        most = int(error.details().split("with batch 1, seq must be in [1, ")[1].split("]")[0])
        assert _steps_run(roomy) == before, "the model ran for a request it then refused"
        # The range is exact: its end is answered whole, one past it is refused.
        reply = stub.ModelInfer(_step("most", 1, most), timeout=60)
        assert len(reply.raw_output_contents[0]) == 4 * most * _engine(roomy).vocab_size
        assert _refusal(stub, _step("past", 1, most + 1)).code() is grpc.StatusCode.INVALID_ARGUMENT
        wide = _refusal(stub, _step("wide", 100_000, 1))
        assert "batch must be in [1, " in wide.details(), wide.details()
        # In a stream the refusal is that request's error; the stream and its next request go on.
        replies = list(stub.ModelStreamInfer(iter([_step("big", 1, 100_000), _step("most", 1, most)]),
                                             timeout=60))
    assert sorted((r.infer_response.id, r.error_message[:40]) for r in replies) == [
        ("big", "INVALID_ARGUMENT: tokens: shape [1, 1000"), ("most", "")]
