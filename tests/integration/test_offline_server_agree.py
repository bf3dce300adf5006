"""The offline runner and the server accept and refuse exactly the same requests (issue 15.3): one
definition of each limit and default (server/core/limits.py), every shared rule in the core. Drawn by
hypothesis over every generation, prediction and scoring parameter, within the server's own caps."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextchar.client.offline import OfflineModel
from nextchar.server.core.vocab import OovPolicy
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

SETTINGS = settings(max_examples=40, deadline=timedelta(seconds=10), database=None,
                    suppress_health_check=[HealthCheck.too_slow])
POLICIES = {pb.OOV_POLICY_ERROR: OovPolicy.ERROR, pb.OOV_POLICY_SKIP: OovPolicy.SKIP,
            pb.OOV_POLICY_REPLACE: OovPolicy.REPLACE}
chars = st.sampled_from([*"O say can you see", "é", "#", "\U0001F600"])
texts = st.lists(chars, max_size=30).map("".join)
temperatures = st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 100.0, 100.5, -1.0, float("nan")]))
oov = st.tuples(st.sampled_from(sorted(POLICIES)), st.sampled_from(["", "y", "é", "yy"]))


@pytest.fixture(scope="module")
def both(server, model_repo: Path):
    offline = OfflineModel.from_file(model_repo / "lstm" / "1" / "model.onnx")
    with grpc.insecure_channel(server.address) as channel:
        yield offline, inference_pb2_grpc.NextCharStub(channel)


def _server(call) -> tuple[str | None, object]:
    """(None, reply) or (the field the server named, None)."""
    try:
        return None, call()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        return e.details().split(":", 1)[0], None


def _offline(call) -> tuple[str | None, object]:
    try:
        return None, call()
    except ValueError as e:  # InvalidParameterError and OutOfVocabularyError both name a field
        return e.field, None


def _oov(policy: int, replacement: str) -> dict:
    return {"oov_policy": POLICIES[policy], "oov_replacement": replacement or None}


@SETTINGS
@given(prompt=texts, n=st.integers(-1, 12), temperature=temperatures, top_k=st.integers(-1, 40),
       top_p=st.one_of(st.none(), st.sampled_from([1e-6, 0.5, 1.0, 0.0, 1.5])),
       seed=st.integers(0, 2**64 - 1), stop=st.lists(st.text(alphabet="ab ", max_size=70), max_size=6),
       echo=st.booleans(), oov=oov)
def test_generate(both, prompt, n, temperature, top_k, top_p, seed, stop, echo, oov) -> None:
    offline, stub = both
    req = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt=prompt, max_new_chars=n, top_k=top_k,
                             seed=seed, stop=stop, echo=echo, oov_policy=oov[0], oov_replacement=oov[1])
    options = {"top_k": top_k, "seed": seed, "stop": stop, "echo": echo, **_oov(*oov)}
    if temperature is not None:
        req.temperature, options["temperature"] = temperature, temperature
    if top_p is not None:
        req.top_p, options["top_p"] = top_p, top_p
    field, reply = _server(lambda: stub.Generate(req, timeout=30))
    offline_field, result = _offline(lambda: offline.generate(prompt, n, **options))
    assert field == offline_field, (field, offline_field)
    if reply is not None:  # seeded: the same text too
        assert reply.text == result.text


@SETTINGS
@given(context=texts, n=st.integers(-1, 40), temperature=temperatures, oov=oov)
def test_predict(both, context, n, temperature, oov) -> None:
    offline, stub = both
    req = pb.PredictNextRequest(model=pb.ModelRef(name="lstm"), context=context, n=n, oov_policy=oov[0],
                                oov_replacement=oov[1])
    options = _oov(*oov)
    if temperature is not None:
        req.temperature, options["temperature"] = temperature, temperature
    field, reply = _server(lambda: stub.PredictNext(req, timeout=30))
    offline_field, result = _offline(lambda: offline.predict(context, n, **options))
    assert field == offline_field, (field, offline_field)
    if reply is not None:
        assert [p.char for p in reply.predictions] == [p.char for p in result]


@SETTINGS
@given(text=texts, context=texts, per_char=st.booleans(), oov=oov)
def test_score(both, text, context, per_char, oov) -> None:
    offline, stub = both
    req = pb.ScoreRequest(model=pb.ModelRef(name="lstm"), text=text, context=context, per_char=per_char,
                          oov_policy=oov[0], oov_replacement=oov[1])
    field, reply = _server(lambda: stub.Score(req, timeout=30))
    offline_field, result = _offline(lambda: offline.score(text, context=context, per_char=per_char,
                                                           **_oov(*oov)))
    assert field == offline_field, (field, offline_field)
    if reply is not None:
        assert reply.scored_chars == result.scored_chars
