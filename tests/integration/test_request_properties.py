"""Property-based requests over every field of every RPC (issue 13.10): the server answers OK or a precise
INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED naming the field, never UNKNOWN or INTERNAL, and keeps
serving. Bounded: a fixed number of examples per RPC, short generations, a per-example deadline."""

from __future__ import annotations

import re
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextchar.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from nextchar.v1 import inference_pb2 as pb

EXAMPLES = 40
SETTINGS = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), database=None,
                    suppress_health_check=[HealthCheck.too_slow])
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
# Vocabulary characters, unknown ones (é, #, an astral emoji, NUL) and the empty string.
chars = st.sampled_from([*"O say can you see\n,.", "é", "#", "\U0001F600", "\x00"])
texts = st.lists(chars, max_size=40).map("".join)
names = st.one_of(st.sampled_from(["lstm", "gru", "rnn", "", "nope", "../etc", "a" * 200]), texts)
refs = st.builds(lambda name, version: pb.ModelRef(name=name, version=version) if version is not None
                 else pb.ModelRef(name=name),
                 names, st.one_of(st.none(), st.integers(-3, 3), st.just(2**62)))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 1.0, 100.0]))
policies = st.integers(-1, 4)  # an open proto3 enum: unknown values arrive as plain numbers
replacement = st.one_of(st.just(""), chars, texts)
FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)?(?:\[\d+\])?): ")


def _generate() -> st.SearchStrategy[pb.GenerateRequest]:
    def build(model, prompt, n, temperature, top_k, top_p, seed, stop, echo, policy, repl):
        req = pb.GenerateRequest(model=model, prompt=prompt, max_new_chars=n, temperature=temperature,
                                 top_k=top_k, stop=stop, echo=echo, oov_policy=policy, oov_replacement=repl)
        if top_p is not None:
            req.top_p = top_p
        if seed is not None:
            req.seed = seed
        return req
    return st.builds(build, refs, texts, st.integers(-2, 20), floats, st.integers(-2, 100),
                     st.one_of(st.none(), floats), st.one_of(st.none(), st.integers(0, 2**64 - 1)),
                     st.lists(st.one_of(texts, st.text(max_size=70)), max_size=6), st.booleans(), policies,
                     replacement)


def _predict() -> st.SearchStrategy[pb.PredictNextRequest]:
    def build(model, context, n, temperature, policy, repl):
        req = pb.PredictNextRequest(model=model, context=context, n=n, oov_policy=policy,
                                    oov_replacement=repl)
        if temperature is not None:
            req.temperature = temperature
        return req
    return st.builds(build, refs, texts, st.integers(-2, 100), st.one_of(st.none(), floats), policies,
                     replacement)


def _score() -> st.SearchStrategy[pb.ScoreRequest]:
    return st.builds(lambda model, text, context, per_char, policy, repl: pb.ScoreRequest(
        model=model, text=text, context=context, per_char=per_char, oov_policy=policy, oov_replacement=repl),
        refs, texts, texts, st.booleans(), policies, replacement)


RPCS = {
    "Generate": _generate(),
    "GenerateStream": _generate(),
    "PredictNext": _predict(),
    "Score": _score(),
    "GetModel": st.builds(lambda model: pb.GetModelRequest(model=model), refs),
    "ListModels": st.just(pb.ListModelsRequest()),
}


def _check_error(err: grpc.RpcError, request) -> None:
    assert err.code() in ALLOWED, (err.code(), err.details(), request)
    match = FIELD.match(err.details() or "")
    if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert match, ("the message does not start with a field name", err.details(), request)
    if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
        [raw] = [v for k, v in err.trailing_metadata() if k == "grpc-status-details-bin"]
        bad = error_details_pb2.BadRequest()
        assert status_pb2.Status.FromString(raw).details[0].Unpack(bad)
        assert {v.field for v in bad.field_violations} == {match.group(1)}, (err.details(), request)


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.address) as public, \
            grpc.insecure_channel(server.server.admin_address) as admin:
        yield inference_pb2_grpc.NextCharStub(public), admin_pb2_grpc.AdminStub(admin)


@pytest.mark.parametrize("rpc", sorted(RPCS))
def test_every_field_of_every_rpc_gets_ok_or_a_precise_error(stubs, rpc: str) -> None:
    stub = stubs[0]

    @SETTINGS
    @given(RPCS[rpc])
    def check(request) -> None:
        try:
            reply = getattr(stub, rpc)(request, timeout=30)
            if rpc == "GenerateStream":
                list(reply)
        except grpc.RpcError as err:
            _check_error(err, request)

    check()
    assert stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=5),
                         timeout=30).summary.usage.generated_chars == 5  # still serving


@pytest.mark.parametrize("rpc", ["LoadModel", "UnloadModel"])
def test_admin_fields_get_ok_or_a_precise_error(stubs, rpc: str) -> None:
    stub, admin = stubs
    # Names of served models are left out of UnloadModel, which would (rightly) stop serving them.
    unload_names = names.filter(lambda n: n not in ("lstm", "gru", "rnn"))

    @SETTINGS
    @given(st.builds(lambda n, v: admin_pb2.LoadModelRequest(name=n, version=v) if v is not None
                     else admin_pb2.LoadModelRequest(name=n), names, st.one_of(st.none(), st.integers(-2, 3)))
           if rpc == "LoadModel" else st.builds(lambda n: admin_pb2.UnloadModelRequest(name=n), unload_names))
    def check(request) -> None:
        try:
            getattr(admin, rpc)(request, timeout=60)
        except grpc.RpcError as err:
            assert err.code() in ALLOWED | {grpc.StatusCode.FAILED_PRECONDITION}, (err.code(), err.details())
            assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)

    check()
    assert stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say", max_new_chars=5),
                         timeout=30).summary.usage.generated_chars == 5
