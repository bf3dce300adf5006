"""A typing session (Session RPC), sync and async: edits answered with predictions, completions streamed."""

from __future__ import annotations

import asyncio
import itertools
import queue
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from nextchar.client.errors import NextCharError, from_rpc_error, from_status
from nextchar.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class SessionUpdate:
    """The answer to an edit: the session's length, what the model read for it, the predictions."""

    text_chars: int
    computed_chars: int      # characters the server stepped: k for an append of k, 0 for a cached delete
    predictions: list[Any]   # client.Prediction, most likely first (empty when the session's n is 0)


def _oov(policy: str) -> pb.OovPolicy:
    from nextchar.client.client import _oov as oov  # client imports this module: resolve at call time

    return oov(policy)


def options_message(n: int, temperature: float | None, oov_policy: pb.OovPolicy,
                    oov_replacement: str) -> pb.SessionOptions:
    o = pb.SessionOptions(n=n, oov_policy=oov_policy, oov_replacement=oov_replacement)
    if temperature is not None:
        o.temperature = temperature
    return o


def complete_message(max_new_chars: int, *, temperature: float | None = None, top_k: int = 0,
                     top_p: float | None = None, seed: int | None = None,
                     stop: tuple[str, ...] | list[str] = ()) -> pb.SessionComplete:
    """temperature 0 = greedy, None = the server's default (1), as in generate_request; seed None = the
    server draws one (returned in the summary)."""
    c = pb.SessionComplete(max_new_chars=max_new_chars, top_k=top_k, stop=list(stop))
    if temperature is not None:
        c.temperature = temperature
    if top_p is not None:
        c.top_p = top_p
    if seed is not None:
        c.seed = seed
    return c


class _Protocol:
    """What both flavours share: request ids, and turning answers into results or typed errors."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.model = ""
        self.version = 0
        self.max_chars = 0
        self.text_chars = 0
        # The id of a completion whose answers may still be on the stream (its caller left the loop
        # early), until its summary or error is read, or an answer to a later request is.
        self._completing: int | None = None

    def _request(self, **action: Any) -> pb.SessionRequest:
        return pb.SessionRequest(id=next(self._ids), **action)

    @staticmethod
    def _stale(request: pb.SessionRequest, answer: pb.SessionResponse | None) -> bool:
        """An answer to an earlier request (the rest of a completion left unread): ids only grow."""
        return answer is not None and answer.id < request.id

    def _check(self, request: pb.SessionRequest, answer: pb.SessionResponse | None) -> pb.SessionResponse:
        if answer is None:
            self._completing = None
            raise from_status(14, "the server ended the session")  # UNAVAILABLE
        if answer.id != request.id:
            raise RuntimeError(f"answer to request {answer.id} while waiting for {request.id}")
        if self._completing is not None and (
                answer.id > self._completing or answer.WhichOneof("event") != "completion_text"):
            self._completing = None  # every answer to that completion has been read
        self.text_chars = answer.text_chars
        if answer.HasField("error"):
            e = answer.error
            raise from_status(e.code, e.message, e.field)
        if answer.HasField("opened"):
            self.model, self.version = answer.opened.model.name, answer.opened.model.version
            self.max_chars = answer.opened.max_chars
        return answer

    @staticmethod
    def _update(answer: pb.SessionResponse) -> SessionUpdate:
        from nextchar.client.client import Prediction

        best = [Prediction(p.char, p.token_id, p.probability, p.logprob)
                for p in answer.predictions.predictions]
        return SessionUpdate(answer.text_chars, answer.computed_chars, best)


class TypingSession(_Protocol):
    """Blocking. Open with NextCharClient.session(); every call waits for its answer. Close (or `with`)."""

    def __init__(self, stub: Any, open_: pb.SessionOpen, timeout: float | None, metadata: Any) -> None:
        super().__init__()
        self._outbox: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._call = stub.Session(iter(self._outbox.get, None), timeout=timeout, metadata=metadata)
        # Dropped without close(): grpc's request thread waits on the queue for good; end it then (the
        # request iterator holds the queue, not the session, so the session can be collected).
        weakref.finalize(self, self._outbox.put, None)
        self._n = open_.options.n
        first = self._send(open=open_)
        try:
            self._next(first)
            # The server answers an open with text or with n > 0 by a predictions message too.
            self.opened = self._update(self._next(first)) if open_.text or self._n else None
        except BaseException:
            self._outbox.put(None)  # grpc's request thread waits on the queue: let it end
            raise

    def _send(self, **action: Any) -> pb.SessionRequest:
        request = self._request(**action)
        self._outbox.put(request)
        return request

    def _next(self, request: pb.SessionRequest) -> pb.SessionResponse:
        while True:
            try:
                answer = next(self._call, None)
            except grpc.RpcError as e:
                self._ended()
                raise from_rpc_error(e) from None
            if answer is None:
                self._ended()
            if not self._stale(request, answer):
                return self._check(request, answer)

    def _ended(self) -> None:
        """The call is over: end grpc's request thread, which would otherwise wait on the outbox forever."""
        self._completing = None
        self._outbox.put(None)

    def _edit(self, **action: Any) -> SessionUpdate:
        request = self._send(**action)
        return self._update(self._next(request))

    def append(self, text: str) -> SessionUpdate:
        return self._edit(append=text)

    def delete(self, n: int = 1) -> SessionUpdate:
        return self._edit(delete=n)

    def reset(self) -> SessionUpdate:
        return self._edit(reset=pb.SessionReset())

    def set_options(self, n: int, temperature: float | None = None, oov_policy: str = "error",
                    oov_replacement: str = "") -> SessionUpdate:
        """New prediction options (oov_policy "error" | "skip" | "replace", as everywhere in the client)."""
        self._n = n
        return self._edit(options=options_message(n, temperature, _oov(oov_policy), oov_replacement))

    def accept(self) -> SessionUpdate:
        """Append the last completion's text (as streamed, without a stop sequence)."""
        return self._edit(accept=pb.SessionAccept())

    def predict(self, n: int = 0) -> list[Any]:
        return self._edit(predict=pb.SessionPredict(n=n)).predictions

    def complete(self, max_new_chars: int, **options: Any) -> Iterator[str]:
        """Stream a completion's pieces; `self.summary` (a GenerationSummary) is set at its end.
        Read it to the end before the next call: its answers come first on the stream."""
        from nextchar.client.client import _summary

        request = self._send(complete=complete_message(max_new_chars, **options))
        self._completing = request.id
        try:
            while True:
                answer = self._next(request)
                if answer.HasField("completion_summary"):
                    self.summary = _summary(answer.completion_summary)
                    return
                yield answer.completion_text
        finally:
            # Left early (break, an exception in the caller's loop): read the rest of this completion
            # now, so the next call's answer comes next. Not when a later call already read past it.
            try:
                while self._completing == request.id:
                    self._next(request)
            except NextCharError:
                pass  # the call failed: the next call reports it

    def close(self) -> None:
        """End the stream (half-close, then wait for the server's end): its state is freed at once."""
        self._completing = None
        self._outbox.put(None)
        try:
            for _ in self._call:  # nothing is unanswered; this waits for the server to end the call
                pass
        except grpc.RpcError:
            self._call.cancel()  # it had already failed (deadline, drain): nothing left to free

    def __enter__(self) -> TypingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTypingSession(_Protocol):
    """The same calls, awaitable; open with `await AsyncNextCharClient.session(...)`."""

    def __init__(self, stub: Any, timeout: float | None, metadata: Any) -> None:
        super().__init__()
        self._call = stub.Session(timeout=timeout, metadata=metadata)
        self.opened: SessionUpdate | None = None

    async def _open(self, open_: pb.SessionOpen) -> AsyncTypingSession:
        first = await self._send(open=open_)
        await self._next(first)
        if open_.text or open_.options.n:  # then the server answers with predictions too
            self.opened = self._update(await self._next(first))
        return self

    async def _finished(self) -> NextCharError:
        """The typed error for a call that already ended: Cancelled when it was cancelled here (an
        awaiting task was cancelled, e.g. by asyncio.wait_for; grpc.aio then cancels the whole call)."""
        code, details = await self._call.code(), await self._call.details()
        if self._call.cancelled():
            return from_status(1, f"the session's call was cancelled ({details}): a call on it was "
                                  "cancelled or timed out; open a new session")  # CANCELLED
        if code == grpc.StatusCode.OK:
            return from_status(14, "the server ended the session")  # UNAVAILABLE
        return from_status(code.value[0], details or "")

    @staticmethod
    def _cancelling() -> bool:
        """Whether the running task itself is being cancelled (then CancelledError must propagate)."""
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _send(self, **action: Any) -> pb.SessionRequest:
        if self._call.done():
            raise await self._finished()
        request = self._request(**action)
        try:
            await self._call.write(request)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except asyncio.CancelledError:
            if self._cancelling():
                raise
            raise await self._finished() from None  # another task's cancel ended the call
        except asyncio.InvalidStateError:
            raise await self._finished() from None
        return request

    async def _next(self, request: pb.SessionRequest) -> pb.SessionResponse:
        while True:
            if self._call.done() and self._call.cancelled():  # else read() raises CancelledError
                raise await self._finished()
            try:
                answer = await self._call.read()
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            except asyncio.CancelledError:
                if self._cancelling():
                    raise
                raise await self._finished() from None
            message = None if answer is grpc.aio.EOF else answer
            if not self._stale(request, message):  # skip the rest of a completion left unread
                return self._check(request, message)

    async def _edit(self, **action: Any) -> SessionUpdate:
        request = await self._send(**action)
        return self._update(await self._next(request))

    async def append(self, text: str) -> SessionUpdate:
        return await self._edit(append=text)

    async def delete(self, n: int = 1) -> SessionUpdate:
        return await self._edit(delete=n)

    async def reset(self) -> SessionUpdate:
        return await self._edit(reset=pb.SessionReset())

    async def set_options(self, n: int, temperature: float | None = None,
                          oov_policy: str = "error", oov_replacement: str = "") -> SessionUpdate:
        return await self._edit(options=options_message(n, temperature, _oov(oov_policy), oov_replacement))

    async def accept(self) -> SessionUpdate:
        return await self._edit(accept=pb.SessionAccept())

    async def predict(self, n: int = 0) -> list[Any]:
        return (await self._edit(predict=pb.SessionPredict(n=n))).predictions

    async def complete(self, max_new_chars: int, **options: Any) -> AsyncIterator[str]:
        """As TypingSession.complete. Left early, its remaining answers are skipped by the next call
        (not drained here: an abandoned async generator is finalized later, in another task)."""
        from nextchar.client.client import _summary

        request = await self._send(complete=complete_message(max_new_chars, **options))
        while True:
            answer = await self._next(request)
            if answer.HasField("completion_summary"):
                self.summary = _summary(answer.completion_summary)
                return
            yield answer.completion_text

    async def close(self) -> None:
        if self._call.done():  # cancelled (e.g. a timed-out call) or ended by the server: nothing to free
            return
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError:
            self._call.cancel()  # it had already failed (deadline, drain): nothing left to free

    async def __aenter__(self) -> AsyncTypingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
