"""One log line and one metrics record per RPC, from a gRPC interceptor; text or JSON log format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from nextchar.server.edge.errors import bounded
from nextchar.server.edge.kserve_wire import STEP_SUFFIX
from nextchar.server.ops.metrics import Metrics, RequestRecord
from nextchar.server.ops.registry import Registry

log = logging.getLogger("nextchar.requests")

# Only calls of these services and methods are observed: health probes (KServe's Server/ModelReady
# and ServerLive too) and reflection would drown the log.
_KSERVE = "/inference.GRPCInferenceService/"
OBSERVED_SERVICES = ("/nextchar.v1.NextChar/", "/nextchar.v1.Admin/", _KSERVE + "ModelInfer",
                     _KSERVE + "ModelMetadata")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_USER_TEXT = ("prompt", "context", "text")
# With --log-prompts, a text past this many chars is cut in the log (its length noted): a refused 4 MB
# prompt must not make a 4 MB log line.
MAX_LOGGED_CHARS = 10_000
DEADLINE_SLACK_S = 0.05  # request fields holding user text: logged only when asked


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a request line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """The process's logging: `fmt` "text" (human) or "json" (one object per line, UTC)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _Call:
    """One observed call: what it asked for, what it got, how long it took."""

    def __init__(self, method: str, request: Any, context: grpc.aio.ServicerContext, registry: Registry,
                 log_prompts: bool) -> None:
        self.started = time.perf_counter()
        self.method = method.rsplit("/", 1)[-1]
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("x-request-id", "")
        self.id = given if isinstance(given, str) and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        ref = getattr(request, "model", None) if hasattr(request, "DESCRIPTOR") else None
        ref = ref if ref is not None and ref.DESCRIPTOR.name == "ModelRef" else None
        if ref is not None:
            name, version = ref.name, ref.version
        else:  # KServe: ModelInferRequest.model_name (or "<name>.step") / ModelMetadataRequest.name
            name = getattr(request, "model_name", "") or getattr(request, "name", "")
            text = getattr(request, "model_version", "") or getattr(request, "version", "")
            version = int(text) if isinstance(text, str) and _digits(text) else 0
        known = registry.names()
        if isinstance(name, str) and name.endswith(STEP_SUFFIX):
            name = name.removesuffix(STEP_SUFFIX)  # KServe's raw-step face of the model
        # Only names the server knows become labels: a caller cannot grow the metrics without bound.
        self.model = name if name in known else ""
        self.version = version if self.model else 0  # the reply names the one used
        texts = {f: getattr(request, f, None) for f in _USER_TEXT} if log_prompts else {}
        self.user_text = {f: bounded(v, MAX_LOGGED_CHARS) for f, v in texts.items()
                          if isinstance(v, str) and v}
        self.code = "OK"
        self.chars = 0            # generated characters: the summary's count, else those delivered
        self.delivered_chars = 0  # text handed to gRPC so far (a stream cut short has no summary)
        self.has_summary = False
        self.messages = 0
        self.ttfc_s: float | None = None
        self.last_message: float | None = None

    def summary(self, s: Any) -> None:
        self.has_summary = True
        self.chars = s.usage.generated_chars
        self.version = s.model.version or self.version
        if s.usage.generated_chars:
            self.ttfc_s = s.timings.time_to_first_char_ms / 1e3

    def response(self, reply: Any) -> None:
        if hasattr(reply, "summary") and reply.HasField("summary"):
            self.summary(reply.summary)
        elif getattr(reply, "model", None) is not None and hasattr(reply.model, "version"):
            self.version = reply.model.version or self.version
        elif hasattr(reply, "model_version"):  # KServe ModelInferResponse
            if _digits(reply.model_version):
                self.version = int(reply.model_version)
            if "generated_chars" in reply.parameters:
                self.chars = reply.parameters["generated_chars"].int64_param

    def fields(self, duration_s: float) -> dict[str, Any]:
        f: dict[str, Any] = {"request_id": self.id, "method": self.method, "model": self.model,
                             "version": self.version, "code": self.code, "chars": self.chars,
                             "duration_ms": round(duration_s * 1e3, 3)}
        if self.ttfc_s is not None:
            f["ttfc_ms"] = round(self.ttfc_s * 1e3, 3)
        f.update(self.user_text)
        return f


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every NextChar and Admin method: request id, status code, characters, timings -> log + metrics.
    """

    def __init__(self, metrics: Metrics, registry: Registry, log_prompts: bool) -> None:
        self._metrics, self._registry, self._log_prompts = metrics, registry, log_prompts

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(OBSERVED_SERVICES) or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, request, context, self._registry, self._log_prompts)
            try:
                reply = await behavior(request, context)
                call.response(reply)
                return reply
            except BaseException as e:
                call.code = _code(e, context)
                raise
            finally:
                self._finish(call, context)
        return unary

    def _stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, request, context, self._registry, self._log_prompts)
            self._metrics.active_streams.inc()
            try:
                # aclosing: a call that ends early stops the generation at once, not at garbage collection.
                async with contextlib.aclosing(behavior(request, context)) as messages:
                    async for message in messages:
                        self._message(call, message)
                        yield message
            except BaseException as e:
                call.code = _code(e, context)
                raise
            finally:
                self._metrics.active_streams.dec()
                self._finish(call, context)
        return stream

    def _message(self, call: _Call, message: Any) -> None:
        if message.HasField("summary"):
            call.summary(message.summary)
            return
        now = time.perf_counter()
        call.messages += 1
        call.delivered_chars += len(message.text)
        if not call.has_summary:
            call.chars = call.delivered_chars
        if call.ttfc_s is None and message.text:  # replaced by the summary's server-side figure
            call.ttfc_s = now - call.started
        if call.last_message is not None and message.text and call.model:
            gap = (now - call.last_message) / len(message.text)
            self._metrics.inter_char.labels(call.model).observe(gap)
        call.last_message = now

    def _finish(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        if call.code == "OK" and context.cancelled():  # the handler finished, but the reply never left
            call.code = _gone(context)
        duration = time.perf_counter() - call.started
        fields = call.fields(duration)
        text = " ".join(f"{k}={json.dumps(v, ensure_ascii=False) if k in _USER_TEXT else v}"
                        for k, v in fields.items())
        log.info("request %s", text, extra={"fields": fields})  # first: a metric seen means a line written
        self._metrics.observe(RequestRecord(call.method, call.model, call.code, duration, call.chars,
                                            call.ttfc_s))


def _digits(text: str) -> bool:
    """A version string int() takes: ASCII digits only ("²".isdigit() is True), and not absurdly long."""
    return text.isascii() and text.isdigit() and len(text) < 10


def _code(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a failed call ended with: what it aborted with, CANCELLED when the caller left."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) or context.cancelled():
        return _gone(context)  # whatever a write to a call that is already over raised
    return "UNKNOWN"


def _gone(context: grpc.aio.ServicerContext) -> str:
    """A call that ended without its handler's status: its deadline passed, or the caller left.

    The client's deadline runs out first (the server's clock started a transit time later) and
    arrives as a cancellation, so a cancel within DEADLINE_SLACK_S of the deadline is the deadline."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= DEADLINE_SLACK_S else "CANCELLED"
