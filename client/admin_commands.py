"""`nextchar admin reload | load | unload`: the nextchar.v1.Admin RPCs of a running server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from nextchar.client import commands
from nextchar.server.ops.config import DEFAULT_ADMIN_ADDRESS

ADMIN_SERVER_ENV = "NEXTCHAR_ADMIN_SERVER"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "admin", help="operate a running server: rescan its repository, load or unload a model",
        description="Admin has its own listener (the server's --admin-address, default "
                    f"{DEFAULT_ADMIN_ADDRESS}); --server defaults to ${ADMIN_SERVER_ENV}, else that address. "
                    "Admin calls need the server's token when it has one; without one the server "
                    "answers them from loopback only.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = commands._add(actions, "reload", "rescan the model repository now; print what changed", _reload)
    commands._server_args(p, timeout=120.0)
    p = commands._add(actions, "load", "serve a model's highest version, or pin one version", _load)
    commands._server_args(p, timeout=120.0)
    p.add_argument("name", help="model name")
    p.add_argument("--model-version", type=int, default=None, help="serve and pin this version")
    p = commands._add(actions, "unload", "stop serving a model (NOT_FOUND until loaded again)", _unload)
    commands._server_args(p)
    p.add_argument("name", help="model name")


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    import grpc

    from nextchar.client.credentials import Credentials, open_channel
    from nextchar.client.errors import from_rpc_error
    from nextchar.v1 import admin_pb2_grpc

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    credentials = Credentials(token=args.token or os.environ.get(commands.TOKEN_ENV) or None, tls=args.tls,
                              tls_ca=path(args.tls_ca), tls_cert=path(args.tls_cert),
                              tls_key=path(args.tls_key))
    target = args.server or os.environ.get(ADMIN_SERVER_ENV) or DEFAULT_ADMIN_ADDRESS
    with open_channel(target, credentials) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=args.timeout, metadata=credentials.metadata())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


def _reload(args: argparse.Namespace) -> int:
    from nextchar.v1 import admin_pb2

    reply = _call(args, "ReloadRepository", admin_pb2.ReloadRepositoryRequest())
    for c in reply.changes:
        version = f" v{c.version}" if c.version else ""
        print(f"{c.name}{version}: {c.action}" + (f" ({c.reason})" if c.reason else ""))
    if not reply.changes:
        print("no changes")
    return 0


def _load(args: argparse.Namespace) -> int:
    from nextchar.v1 import admin_pb2

    request = admin_pb2.LoadModelRequest(name=args.name)
    if args.model_version is not None:
        request.version = args.model_version
    reply = _call(args, "LoadModel", request)
    print(f"{reply.model.name}: serving v{reply.model.version}")
    return 0


def _unload(args: argparse.Namespace) -> int:
    from nextchar.v1 import admin_pb2

    _call(args, "UnloadModel", admin_pb2.UnloadModelRequest(name=args.name))
    print(f"{args.name}: unloaded")
    return 0
