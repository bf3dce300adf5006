"""Requests whose bytes do not parse (garbage, invalid UTF-8 in a string): INVALID_ARGUMENT, no traceback."""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0  # one log line per this many seconds at most, however many callers send garbage


class Malformed:
    """What the request deserializer returns instead of raising (grpc would log a traceback and
    answer UNKNOWN); the handler then refuses the call."""

    def __init__(self, error: str) -> None:
        self.error = error


class _RateLimitedLog:
    def __init__(self, every_s: float) -> None:
        self._every_s, self._lock = every_s, threading.Lock()
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, method: str, error: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self._every_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        log.warning("malformed request to %s refused (INVALID_ARGUMENT): %s; %d more since the last "
                    "such line", method, error, suppressed)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Give every unary-request handler a deserializer that never raises; a request that did not
    parse is refused with INVALID_ARGUMENT before any servicer (or auth check) sees it.

    Installed innermost, so the request log and metrics still see the call and its status."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self._log = _RateLimitedLog(every_s)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not (
                handler.response_streaming and inspect.isasyncgenfunction(handler.stream_stream)):
            return handler  # no such RPC here: the bidirectional ones (Session, ModelStreamInfer) are below
        method, parse = details.method, handler.request_deserializer

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # protobuf's DecodeError and kin: the caller's bytes, not our bug
                return Malformed(f"{type(e).__name__}: {str(e)[:200]}")

        async def refuse(request: Malformed, context: grpc.aio.ServicerContext) -> None:
            self._log.warning(method, request.error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: the message does not parse as {method} expects "
                                "(malformed protobuf or invalid UTF-8 in a string field)")

        if handler.request_streaming:  # bidirectional: a message that does not parse ends the call
            bidi_behavior = handler.stream_stream

            async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async for request in requests:
                    if isinstance(request, Malformed):
                        await refuse(request, context)
                    yield request

            async def bidi(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with contextlib.aclosing(bidi_behavior(checked(requests, context), context)) as replies:
                    async for reply in replies:
                        yield reply

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=deserialize, response_serializer=handler.response_serializer)
        if handler.response_streaming and inspect.isasyncgenfunction(handler.unary_stream):
            behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await refuse(request, context)
                async with contextlib.aclosing(behavior(request, context)) as replies:
                    async for reply in replies:
                        yield reply

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserialize, response_serializer=handler.response_serializer)
        # A unary reply, or a stream written with context.write (health's Watch): a coroutine.
        unary_behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
                else grpc.unary_unary_rpc_method_handler)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                await refuse(request, context)
            return await unary_behavior(request, context)

        return make(unary, request_deserializer=deserialize, response_serializer=handler.response_serializer)
