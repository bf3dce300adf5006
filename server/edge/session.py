"""The Session RPC's loop: edits and requests in order, answered on the stream; state freed at the end."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from nextchar.server.core.generation import Finished
from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.core.scoring import top_entries
from nextchar.server.core.session import SessionLimits, SessionOptions, Step, TypingSession
from nextchar.server.edge import session_wire as sw
from nextchar.server.edge import wire
from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError, Registry
from nextchar.server.ops.sessions import SessionIdleError, SessionsClosedError, SessionTable
from nextchar.server.scheduling.budget import MemoryBudget, call_bytes
from nextchar.server.scheduling.clients import ClientSlots, client_key
from nextchar.server.scheduling.runner import Outcome, Runner, ShuttingDownError
from nextchar.server.scheduling.session_steps import StepCoalescer
from nextchar.v1 import inference_pb2 as pb

EDITS = ("append", "delete", "reset", "options", "accept")


class _Live:
    """One open session as its stream sees it: the model, the text and state, the options."""

    def __init__(self, model: LoadedModel, session: TypingSession, opts: SessionOptions) -> None:
        self.model, self.session, self.opts = model, session, opts


class SessionService:
    """Serves Session streams. `resolve` turns a ModelRef into a loaded model (the servicer's `_model`).

    Keystrokes (edits) step through `steps` (StepCoalescer: one row per session, calls shared with the
    other sessions' steps, small ones on the event loop); completions are generations resumed from
    the session's state, run by `runner` like any GenerateStream, so they share the continuous
    batcher's calls (K chars each) with the model's other generations."""

    def __init__(self, registry: Registry, table: SessionTable, steps: StepCoalescer, runner: Runner,
                 limits: wire.Limits, session_limits: SessionLimits,
                 resolve: Callable[[pb.ModelRef, grpc.aio.ServicerContext], Awaitable[LoadedModel]],
                 clients: ClientSlots | None = None, budget: MemoryBudget | None = None) -> None:
        self.registry, self.table, self.steps, self.runner = registry, table, steps, runner
        self.limits, self.session_limits, self._resolve = limits, session_limits, resolve
        self.clients = clients or ClientSlots(0)
        self.budget = budget or MemoryBudget(1 << 62)  # None: no memory limit (tests of other things)
        self._edits: dict[str, Any] = {}  # the edits counter's child per kind

    async def serve(self, requests: Any,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        reader = self.table.reader(requests)
        try:
            first = await reader.next()
            if first is None:
                return
            if first.WhichOneof("action") != "open":
                raise InvalidParameterError("open",
                                            "the first message of a session must be open, and only it")
            model = await self._resolve(first.open.model, context)
            sw.options(first.open.options, model)  # a bad option fails the open before anything is held
            # An open session is a call in flight of its client (--max-per-client) for as long as it lasts.
            with self.clients.hold(client_key(context.peer(), context.invocation_metadata() or ())):
                # A reload unloads the version only after the session; a session that named no
                # version and whose lookup a reload overtook opens on the new default.
                held = self.registry.acquire(model.name, model.version)
                if held is None and not wire.pinned(first.open.model):
                    held = self.registry.acquire(model.name, None)
                if held is None:
                    raise ModelNotFoundError("model.name", f"{model.name!r} version {model.version} was just "
                                                           "unloaded; retry for the current version")
                try:
                    opts = sw.options(first.open.options, held)
                    session = TypingSession(held.artifact.vocab, held.engine.vocab_index, self.session_limits)
                    # Closed here, not left to the collector, when gRPC closes this stream mid-write.
                    async with contextlib.aclosing(self._lifetime(_Live(held, session, opts), first, reader,
                                                                  context)) as answers:
                        async for message in answers:
                            reader.writing()  # until gRPC takes it: a client that never reads ends idle
                            yield message
                            reader.written()
                finally:
                    self.registry.release(held)
        finally:
            reader.close()

    async def _lifetime(self, live: _Live, first: pb.SessionRequest, reader: Any,
                        context: grpc.aio.ServicerContext) -> AsyncGenerator[pb.SessionResponse, None]:
        """The session from its open to its end, held in the session table; the end's reason counted."""
        session, opts, reason = live.session, live.opts, "error"
        with self.table.hold(session):
            try:
                yield sw.opened(first.id, live.model, self.session_limits.max_chars)
                if first.open.text or opts.n:
                    step = session.append(session.encode(first.open.text, "open.text", opts.oov_policy,
                                                         opts.oov_replacement), "open.text")
                    yield await self._edit(live, first.id, step)
                while (request := await reader.next()) is not None:
                    if request.WhichOneof("action") == "complete":
                        async for message in self._complete_answers(live, request):
                            yield message
                    else:  # the common case, a keystroke: one answer, no generator per message
                        yield await self._answer(live, request)
                # A client that cancels can look like one that closed its side first.
                reason = "cancelled" if context.cancelled() else "closed"
            except SessionIdleError:
                reason = "idle"
                raise
            # ShuttingDownError: a step or completion the runner refused once the drain had begun (it
            # refuses calls before the table ends the sessions); the session ends by the drain all the same.
            except (SessionsClosedError, ShuttingDownError):
                reason = "drain"
                raise
            except (asyncio.CancelledError, GeneratorExit):
                reason = reader.ended or "cancelled"  # the idle TTL may end a session stuck writing
                raise
            finally:
                self.table.ended_by(reason)

    async def _answer(self, live: _Live, request: pb.SessionRequest) -> pb.SessionResponse:
        """The answer to an edit or a predict; a bad request gets an error answer and changes nothing."""
        arrived = time.perf_counter()
        kind = request.WhichOneof("action") or "none"
        self._count(kind)
        try:
            if kind in EDITS:
                answer = await self._edit(live, request.id, self._prepare(live, request, kind))
                if kind == "accept":  # only once committed: a failed step leaves it to accept again
                    live.session.last_completion = ""
                self.table.keystroke.observe(time.perf_counter() - arrived)
                return answer
            if kind == "predict":
                n = sw.predict_n(request.predict, live.opts, live.model)
                return self._predictions(live, request.id, 0, n)
            raise InvalidParameterError(kind, "open is only allowed as the first message"
                                        if kind == "open" else "the request has no action")
        except Exception as e:
            return self._error_answer(live, request, e)

    async def _complete_answers(self, live: _Live,
                                request: pb.SessionRequest) -> AsyncIterator[pb.SessionResponse]:
        """A completion's answers; a bad one gets an error answer and changes nothing."""
        self._count("complete")
        try:
            async for message in self._complete(live, request):
                yield message
        except Exception as e:
            yield self._error_answer(live, request, e)

    def _count(self, kind: str) -> None:
        child = self._edits.get(kind)
        if child is None:  # one labels() lookup per kind, not per message
            child = self._edits[kind] = self.table.edits.labels(kind)
        child.inc()

    @staticmethod
    def _error_answer(live: _Live, request: pb.SessionRequest, e: Exception) -> pb.SessionResponse:
        answer = sw.error(request.id, live.session.length, e)
        if answer is None:
            raise e
        return answer

    def _prepare(self, live: _Live, request: pb.SessionRequest, kind: str) -> Step:
        s = live.session
        if kind == "append":
            if not request.append:
                raise InvalidParameterError("append", "must have at least one character")
            opts = live.opts
            return s.append(s.encode(request.append, "append", opts.oov_policy, opts.oov_replacement))
        if kind == "delete":
            return s.delete(int(request.delete))
        if kind == "reset":
            return s.reset()
        if kind == "accept":
            if not s.last_completion:
                raise InvalidParameterError("accept", "there is no completion to accept (or it was empty)")
            return s.append(s.encode(s.last_completion, "accept"), "accept")
        live.opts = sw.options(request.options, live.model)
        return Step(np.zeros(0, np.int64), s.state, s.length, s.logits)

    async def _edit(self, live: _Live, rid: int, step: Step) -> pb.SessionResponse:
        logits, state = step.logits, step.state
        tokens, kept = step.tokens, None
        if step.keep:  # a long step: the state at its checkpoint first, kept for later deletes
            kept = logits, state = await self.steps.step(live.model.engine, tokens[:step.keep], state,
                                                         caller=live.session)
            tokens = tokens[step.keep:]
        if tokens.size:
            logits, state = await self.steps.step(live.model.engine, tokens, state, caller=live.session)
        live.session.commit(step, logits, state, kept)
        return self._predictions(live, rid, int(step.tokens.size), live.opts.n)

    def _predictions(self, live: _Live, rid: int, computed: int, n: int) -> pb.SessionResponse:
        s = live.session
        if s.logits is None or n == 0:
            return sw.predictions(rid, s.length, computed, s.vocab)
        top = top_entries(s.logits, min(n, len(s.vocab)), live.opts.temperature)
        return sw.predictions(rid, s.length, computed, s.vocab, top)

    async def _complete(self, live: _Live, request: pb.SessionRequest) -> AsyncIterator[pb.SessionResponse]:
        """A generation resumed from the session's state and last logits (Runner.generate's `start`), in
        the model's batcher like any other; the session itself is unchanged until `accept`."""
        s, rid = live.session, request.id
        c = sw.completion(request.complete, live.model, self.limits)
        request_ = s.completion(c.max_new_chars, c.sampling, c.seed, c.stop)
        assert s.state is not None and s.logits is not None  # a session completes only once it holds text
        pieces: list[str] = []
        finished: Finished | None = None
        # Its memory, like any generation's (the prompt is not read again: the chars it generates).
        with self.budget.reserve(call_bytes(c.max_new_chars, len(s.vocab))):
            run = self.runner.generate(live.model.engine, request_, start=(s.state, s.logits))
            async with contextlib.aclosing(run) as items:
                async for item in items:
                    if isinstance(item, Outcome):
                        finished = item.finished
                        break
                    pieces.append(item)
                    # The client now sees this completion: should it fail from here, an accept must not
                    # append an earlier one (until the first piece it changed nothing, as its error says).
                    s.last_completion = ""
                    yield sw.completion_text(rid, s.length, item)
        assert finished is not None  # the runner ends every generation with one Outcome, or raises
        s.last_completion = "".join(pieces)
        computed = max(0, finished.usage.generated_chars - 1)  # each char but the last was read back
        yield sw.completion_summary(rid, s.length, computed, finished, live.model)
