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


def _text(*inputs: kpb.ModelInferRequest.InferInputTensor) -> kpb.ModelInferRequest:
    """A generation request: text_input and max_tokens, typed, then `inputs`."""
    tensor, contents = kpb.ModelInferRequest.InferInputTensor, kpb.InferTensorContents
    return kpb.ModelInferRequest(model_name="lstm", inputs=[
        tensor(name="text_input", datatype="BYTES", shape=[1], contents=contents(bytes_contents=[b"O say"])),
        tensor(name="max_tokens", datatype="INT32", shape=[1], contents=contents(int_contents=[3])), *inputs])


def _raw(request: kpb.ModelInferRequest, *raw: bytes) -> kpb.ModelInferRequest:
    """`request` with its inputs' contents replaced by `raw` (raw_input_contents, one per input)."""
    for tensor in request.inputs:
        tensor.ClearField("contents")
    request.raw_input_contents.extend(raw)
    return request


def _element(value: bytes) -> bytes:
    """One BYTES element in raw form: a 4-byte little-endian length, then the bytes."""
    return len(value).to_bytes(4, "little") + value


def test_inputs_are_counted_named_and_shaped_before_their_contents_are_decoded(roomy) -> None:
    """Each request breaks a bound that its declared inputs show (how many, their shapes) and also has
    contents that decoding would refuse: the refusal names the bound, so nothing was decoded first.
    (Every input was decoded first, on the event loop: 165,000 tiny named inputs cost 0.62 s of CPU
    per 4 MB request, 1,000,000 stop words 0.51 s; the bounds were checked after.)"""
    tensor, contents = kpb.ModelInferRequest.InferInputTensor, kpb.InferTensorContents
    engine = _engine(roomy)
    state = [engine.num_layers, 1, engine.hidden_size]
    wide = [engine.num_layers, 1, engine.hidden_size + 1]
    raw_text = (_element(b"O say"), (3).to_bytes(4, "little"))
    many = kpb.ModelInferRequest(model_name="lstm", inputs=[  # the first has 2 elements for its shape [1]
        tensor(name=f"i{i}", datatype="BOOL", shape=[1],
               contents=contents(bool_contents=[True] * (1 + (i == 0)))) for i in range(100_000)])
    outputs = _text()
    outputs.outputs.extend(kpb.ModelInferRequest.InferRequestedOutputTensor(name=f"o{i}")
                           for i in range(100_000))
    cases = [
        (many, "inputs: must have at most 8 tensors (one per input of model 'lstm': text_input, "),
        (outputs, "outputs: must name at most 1 outputs (those of model 'lstm': text_output), got 100000"),
        # 900,000 stop words, their raw contents ending inside a length prefix
        (_raw(_text(tensor(name="stop_words", datatype="BYTES", shape=[900_000])), *raw_text,
              b"\0\0\0\0" * 899_999 + b"\0\0"), "stop_words: must have at most 4 sequences, got 900000"),
        (_text(tensor(name="stop_words", datatype="BYTES", shape=[5],
                      contents=contents(bytes_contents=[b"a"]))),
         "stop_words: must have at most 4 sequences, got 5"),
        # 4 declared, 500,000 in the raw contents: splitting stops at the fifth
        (_raw(_text(tensor(name="stop_words", datatype="BYTES", shape=[4])), *raw_text,
              _element(b"a") * 500_000),
         "stop_words: raw BYTES contents hold more than the 4 elements of shape [4]"),
        (_text(tensor(name="top_k", datatype="INT32", shape=[2], contents=contents(int_contents=[1]))),
         "top_k: must have exactly one element, got shape [2]"),
        (kpb.ModelInferRequest(model_name="lstm.step", inputs=[tensor(
            name="tokens", datatype="INT64", shape=[1, 3_900_000], contents=contents(int64_contents=[1]))]),
         "tokens: must have at most 100000 elements (batch x seq, the server's prompt limit), got 3900000"),
        (_raw(kpb.ModelInferRequest(model_name="lstm.step", inputs=[  # h0 one too wide, and empty
            tensor(name="tokens", datatype="INT64", shape=[1, 1]),
            tensor(name="h0", datatype="FP32", shape=wide)]), (1).to_bytes(8, "little"), b""),
         f"h0: must be FP32 of shape {state} [num_layers, batch, hidden_size]; got {wide}"),
    ]
    with grpc.insecure_channel(roomy.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for request, expected in cases:
            error = _refusal(stub, request)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert error.details().startswith(expected), (expected, error.details())


def test_the_step_bound_is_the_configured_message_limit(make_server) -> None:
    """The bound is the server's --max-message-bytes, not the default: at 1 MiB a step that fits in 4 MiB
    but not in 1 is refused before it runs (it ran, then failed RESOURCE_EXHAUSTED on the way out)."""
    server = make_server(max_prompt_chars=100_000, max_message_bytes=1 << 20)
    seq = (2 << 20) // (4 * _engine(server).vocab_size)  # ~2 MiB of logits
    with grpc.insecure_channel(server.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        before = _steps_run(server)
        error = _refusal(stub, _step("two-mib", 1, seq))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "1048576" in error.details(), error.details()
        assert _steps_run(server) == before
