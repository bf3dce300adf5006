"""Admin has its own listener, never the public port (issue 13.4): a proxy in front of the public port
(Envoy: every call then arrives from 127.0.0.1) cannot reach Admin, and reflection speaks v1 and v1alpha."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from nextchar.server.ops.config import ConfigError
from nextchar.v1 import admin_pb2, admin_pb2_grpc

RELOAD = admin_pb2.ReloadRepositoryRequest()


def _reload(address: str, token: str | None = None) -> admin_pb2.ReloadRepositoryResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).ReloadRepository(RELOAD, timeout=30, metadata=metadata)


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_admin_is_not_on_the_public_port_even_from_loopback(make_server, token) -> None:
    server = make_server(auth_token=token)
    with pytest.raises(grpc.RpcError) as e:
        _reload(server.address, token)  # what a loopback proxy in front of the public port would send
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert list(_reload(server.server.admin_address, token).changes) == []
    if token:
        with pytest.raises(grpc.RpcError) as e:
            _reload(server.server.admin_address)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_on_a_unix_socket(make_server, tmp_path: Path) -> None:
    socket = f"unix:{tmp_path}/admin.sock"
    server = make_server(admin_address=socket)
    assert server.server.admin_address == socket
    assert list(_reload(socket).changes) == []


def test_a_non_loopback_admin_listener_needs_a_token(model_repo: Path) -> None:
    from server_harness import server_config

    with pytest.raises(ConfigError, match=r"--admin-address .*needs --auth-token"):
        server_config(model_repo, admin_address="0.0.0.0:7000")
    assert server_config(model_repo, admin_address="0.0.0.0:7000", auth_token="t").admin_address
    for admin in ("127.0.0.1:7001", "127.0.0.1:07001", "[::1]:007001"):  # the port as a number, not text
        with pytest.raises(ConfigError, match=r"--admin-address .*never served on the public port"):
            server_config(model_repo, port=7001, admin_address=admin)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha_list_the_public_services(server, version: str) -> None:
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            method, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        [reply] = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {"nextchar.v1.NextChar", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert "nextchar.v1.Admin" not in names


# --- a port shared by two listeners fails at bind (grpc sets SO_REUSEPORT unless told not to) -------


def test_an_admin_address_on_the_public_port_fails_to_start(model_repo: Path) -> None:
    """Were both listeners to set SO_REUSEPORT, both would bind and loopback calls to the public port
    could reach Admin. The config check refuses the plain case; one that gets past it still fails."""
    from server_harness import ServerThread, free_port, server_config

    port = free_port()
    config = server_config(model_repo, port=port)
    object.__setattr__(config, "admin_address", f"127.0.0.1:{port}")  # past the config check
    with pytest.raises(OSError, match=rf"cannot bind 127\.0\.0\.1:{port}"):
        ServerThread(config)


@pytest.mark.parametrize("listener", ["public", "admin"])
def test_neither_listener_shares_its_port_with_a_reuseport_socket(model_repo: Path, listener: str) -> None:
    """A socket bound with SO_REUSEPORT (as grpc's own listeners are by default) keeps its port: each
    of our listeners binds without SO_REUSEPORT, so it fails with a clear error instead of sharing."""
    import socket

    from server_harness import ServerThread, server_config

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        address = {"port": port} if listener == "public" else {"admin_address": f"127.0.0.1:{port}"}
        with pytest.raises(OSError, match=rf"cannot bind 127\.0\.0\.1:{port}"):
            ServerThread(server_config(model_repo, **address))
