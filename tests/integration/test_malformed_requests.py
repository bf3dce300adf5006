"""Bytes that do not parse (issue 13.3): INVALID_ARGUMENT, one rate-limited log line, no traceback."""

from __future__ import annotations

import logging

import grpc
import pytest

from nextchar.client.client import NextCharClient
from nextchar.client.credentials import Credentials

BAD_UTF8 = b"\x0a\x02\xc3\x28"  # field 1, a 2-byte string that is not UTF-8
GARBAGE = {
    "not protobuf": b"\xff\xff\xff\xff\x0f",
    "truncated": b"\x12\x10O say",
}
# method -> its request with invalid UTF-8 in a string field (NextChar: model.name; else field 1)
METHODS = {
    "/nextchar.v1.NextChar/Generate": b"\x0a\x04" + BAD_UTF8 + b"\x12\x05O say\x18\x05",
    "/nextchar.v1.NextChar/GenerateStream": b"\x0a\x04" + BAD_UTF8 + b"\x12\x05O say\x18\x05",
    "/nextchar.v1.NextChar/Score": b"\x0a\x04" + BAD_UTF8,
    "/nextchar.v1.NextChar/GetModel": b"\x0a\x04" + BAD_UTF8,
    "/nextchar.v1.Admin/LoadModel": BAD_UTF8,
    "/grpc.health.v1.Health/Check": BAD_UTF8,
}


BIDI = ("/nextchar.v1.NextChar/Session", "/inference.GRPCInferenceService/ModelStreamInfer")


@pytest.mark.parametrize("method", BIDI)
def test_a_malformed_message_on_a_bidirectional_stream_is_invalid_argument(server, caplog, method) -> None:
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(method)(iter([GARBAGE["not protobuf"]]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "does not parse" in err.value.details()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _call(channel: grpc.Channel, method: str, body: bytes, token: str | None = None) -> grpc.RpcError:
    streaming = method.endswith("GenerateStream")
    call = (channel.unary_stream if streaming else channel.unary_unary)(method)
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        reply = call(body, timeout=10, metadata=metadata)
        list(reply) if streaming else reply
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{method} accepted {body!r}")


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_malformed_bytes_are_invalid_argument_without_tracebacks(make_server, caplog, token) -> None:
    server = make_server(auth_token=token)
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.address) as public, \
            grpc.insecure_channel(server.server.admin_address) as admin:
        for method, bad_utf8 in METHODS.items():
            channel = admin if "Admin" in method else public
            for body in (*GARBAGE.values(), bad_utf8):
                err = _call(channel, method, body, token)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body, err.details())
                assert "does not parse" in err.details()
        if token:  # without the token: refused as unauthenticated, also without a traceback
            err = _call(public, "/nextchar.v1.NextChar/Generate", GARBAGE["not protobuf"])
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    malformed = [r for r in caplog.records if r.name == "nextchar.server.edge.malformed"]
    assert len(malformed) == 1  # 18 refusals, one line (rate-limited)
    with NextCharClient(server.address, timeout=30, credentials=Credentials(token=token)) as client:
        assert len(client.generate("lstm", "O say", 5).text) == 5
