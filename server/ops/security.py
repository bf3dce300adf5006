"""Transport and caller security: TLS / mutual TLS credentials, bearer-token auth, Admin access rules."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

# Health stays open: orchestrators probe it without credentials (it reveals only SERVING or not).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_PREFIX = "/nextchar.v1.Admin/"
_BEARER = "bearer "


class TokenError(ValueError):
    """A token file that cannot be used; the message names the file."""


def read_token(path: Path) -> str:
    """The first line of a token file (e.g. a mounted secret), without surrounding whitespace."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"--auth-token-file {str(path)!r}: unreadable: {e}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise TokenError(f"--auth-token-file {str(path)!r}: is empty")
    if not all(33 <= ord(c) <= 126 for c in token):  # as --auth-token: gRPC metadata is ASCII
        raise TokenError(f"--auth-token-file {str(path)!r}: the token must be non-empty printable ASCII "
                         "without spaces")
    return token


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with `cert`/`key` (PEM); with `client_ca`, mutual TLS: clients must present a cert it signed."""
    pair = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(client_ca).read_bytes(),
                                       require_client_auth=True)


def is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:..." (local by definition)."""
    if peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        host = rest.rpartition("]")[0].lstrip("[")
    elif kind == "ipv4":
        host = rest.rpartition(":")[0]
    else:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health needs `authorization: Bearer <token>` when a token is set (UNAUTHENTICATED).

    Admin calls always need it when a token is set; with no token they are allowed from loopback
    peers only (PERMISSION_DENIED otherwise), so an unprotected server cannot be reconfigured remotely.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        method = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        if self._token is not None:
            problem = self._check(dict(details.invocation_metadata or ()).get("authorization"))
            if problem is not None:
                return _deny(await continuation(details), grpc.StatusCode.UNAUTHENTICATED, problem)
            return await continuation(details)
        handler = await continuation(details)
        if handler is None or not method.startswith(ADMIN_PREFIX):
            return handler
        return _loopback_only(handler)

    def _check(self, header: Any) -> str | None:
        if not isinstance(header, str) or not header:
            return "missing 'authorization: Bearer <token>' metadata"
        if not header.lower().startswith(_BEARER):
            return "the authorization metadata must be 'Bearer <token>'"
        given = header[len(_BEARER):].strip().encode()
        assert self._token is not None  # checked by the caller: only a configured token is compared
        return None if hmac.compare_digest(given, self._token) else "invalid token"


def _deny(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same shape as `handler` that fails every call with `code`."""
    if handler is None:
        return None

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # an async generator, as grpc expects of a streaming handler

    ser = {"request_deserializer": handler.request_deserializer,
           "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **ser)
    return grpc.unary_unary_rpc_method_handler(unary, **ser)


def _loopback_only(handler: Any) -> Any:
    """Admin methods are unary: refuse callers that are not on this host."""
    behavior = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not is_loopback_peer(context.peer()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Admin calls without an auth token are allowed from loopback only; "
                                "start the server with --auth-token to administer it remotely")
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
