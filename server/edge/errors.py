"""Domain errors -> gRPC status codes with google.rpc details, in one table; anything else is a logged bug."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from nextchar.server.core.artifact import ArtifactError, ModelNameError
from nextchar.server.core.limits import MAX_LISTED_VIOLATIONS, MAX_MESSAGE_CHARS
from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.core.session import SessionTextLimitError
from nextchar.server.core.vocab import OutOfVocabularyError
from nextchar.server.ops.registry import ModelNotFoundError
from nextchar.server.ops.sessions import SessionIdleError, SessionsClosedError, SessionsFullError
from nextchar.server.scheduling.batching import BatcherClosedError, CapacityError
from nextchar.server.scheduling.budget import MemoryBudgetError
from nextchar.server.scheduling.clients import ClientLimitError
from nextchar.server.scheduling.runner import DeadlineError, OverloadedError, ShuttingDownError

log = logging.getLogger(__name__)

# The one table. Order matters: the first matching class wins, so subclasses come first
# (OutOfVocabularyError is a ValueError; ModelNameError is an ArtifactError).
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (OutOfVocabularyError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ArtifactError, grpc.StatusCode.FAILED_PRECONDITION),  # a version on disk that cannot be served
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),   # the batcher's queue is full
    (MemoryBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # --memory-budget-mb
    (ClientLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),   # --max-per-client
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (SessionsFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),      # --max-sessions open
    (SessionTextLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),  # the per-session memory bound
    (SessionIdleError, grpc.StatusCode.DEADLINE_EXCEEDED),        # idle past --session-idle-ttl
    (SessionsClosedError, grpc.StatusCode.UNAVAILABLE),           # draining
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),     # its model version was unloaded meanwhile
)


def status_code_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a domain error; None for anything the table does not know (a bug)."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return None


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


def _violations(exc: BaseException) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """BadRequest field violations: one per unknown character (the first MAX_LISTED_VIOLATIONS, then
    one saying how many more), or one for the field at fault."""
    violation = error_details_pb2.BadRequest.FieldViolation
    if isinstance(exc, OutOfVocabularyError):
        listed = [violation(field=exc.field,
                            description=f"character {ch!r} at position {pos} is not in the vocabulary")
                  for pos, ch in exc.positions[:MAX_LISTED_VIOLATIONS]]
        more = len(exc.positions) - len(listed)
        if more > 0:
            listed.append(violation(field=exc.field, description=f"and {more} more characters not in "
                                                                 "the vocabulary"))
        return listed
    if isinstance(exc, ModelNameError):
        return [violation(field="model.name", description=bounded(str(exc), MAX_MESSAGE_CHARS))]
    field = getattr(exc, "field", None)
    if field and status_code_for(exc) is grpc.StatusCode.INVALID_ARGUMENT:
        message = str(exc).removeprefix(f"{field}: ")
        return [violation(field=bounded(field, 64), description=bounded(message, MAX_MESSAGE_CHARS))]
    return []


def to_status(exc: BaseException) -> grpc.Status:
    """A domain error as a grpc.Status carrying a google.rpc.Status (with BadRequest details if any).

    Bounded whatever the request held: the message and each description are cut at
    MAX_MESSAGE_CHARS and at most MAX_LISTED_VIOLATIONS + 1 violations are listed, so the trailers
    stay a few KiB (clients refuse trailers past 8-16 KiB, and then report that instead of the error).
    """
    code = status_code_for(exc)
    if code is None:
        raise TypeError(f"{type(exc).__name__} is not a domain error") from exc
    message = str(exc)
    if isinstance(exc, ModelNameError):
        message = f"model.name: {exc}"
    status = status_pb2.Status(code=code.value[0], message=bounded(message, MAX_MESSAGE_CHARS))
    violations = _violations(exc)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
        status.details.append(detail)
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if status_code_for(exc) is None:
        log.exception("bug in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (logged on the server)")
    await context.abort_with_status(to_status(exc))


def mapped(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an aio servicer method (coroutine or async generator) so domain errors become statuses."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                # aclosing: when the reply stops being read, the inner generator (and whatever it holds:
                # admission slots, the model version, the generation) is closed now, not at GC.
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort(context, e, name)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e, name)
    return unary
