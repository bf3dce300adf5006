"""The live typing sessions of one server: admission (max sessions), idle TTL, drain, and their metrics."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nextchar.server.core.session import TypingSession

# Per-keystroke latency: an edit's arrival to its answer being handed to gRPC; 50 µs to 2.5 s.
# Sessions' states are thousands of small arrays that malloc keeps in its arenas after they are freed,
# and an ended stream's objects wait in reference cycles (its traceback) for the collector: after this
# many sessions ended (or the last one), collect and trim the arenas, so RSS comes back down.
TRIM_EVERY = 64
_RECLAIM_DELAY_S = 0.05  # let the ended streams' frames go first
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_malloc_trim = getattr(_LIBC, "malloc_trim", None)  # glibc only; elsewhere RSS stays as malloc leaves it
_KEYSTROKE = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


class SessionsFullError(RuntimeError):
    """--max-sessions sessions are open; the client should retry later or elsewhere."""


class SessionIdleError(TimeoutError):
    """A session sent nothing for longer than the idle TTL; its state was freed."""


class SessionsClosedError(RuntimeError):
    """The server is draining: open sessions end, new ones are refused."""


class SessionTable:
    """Every open session by id. A session is held from its open to the end of its stream (`hold`),
    whatever ends it, so its state is freed the moment the stream ends; `active` is what a scrape sees."""

    def __init__(self, max_sessions: int, idle_ttl_s: float,
                 registry: CollectorRegistry | None = None) -> None:
        self.max_sessions, self.idle_ttl_s = max_sessions, idle_ttl_s
        self.active: dict[int, TypingSession] = {}
        self._ids = itertools.count(1)
        self.closing = False  # set by close(): waiting readers end at once, the others at their next read
        self.waiting: set[SessionReader] = set()
        self.opened = self.refused = 0
        self.trims = 0
        self._ended_since_trim = 0
        self._reclaim: asyncio.TimerHandle | None = None
        self.ended: dict[str, int] = {}  # how sessions ended: closed, cancelled, idle, drain, error
        r = registry if registry is not None else CollectorRegistry()
        self.edits = Counter("nextchar_session_edits", "Session edits and requests by kind", ["kind"],
                             registry=r)
        self.evictions = Counter("nextchar_session_evictions",
                                 "Sessions ended by the server (idle TTL, drain)", ["reason"], registry=r)
        self.keystroke = Histogram("nextchar_session_keystroke_seconds",
                                   "An edit's arrival to its answer (predictions) leaving the server",
                                   buckets=_KEYSTROKE, registry=r)
        r.register(_SessionCollector(self))

    @contextlib.contextmanager
    def hold(self, session: TypingSession) -> Iterator[int]:
        """Admit `session` (SessionsFullError at max_sessions) until the block ends; its id."""
        if self.closing:
            raise SessionsClosedError("the server is shutting down; open the session on another instance")
        if len(self.active) >= self.max_sessions:
            self.refused += 1
            raise SessionsFullError(f"{len(self.active)} sessions are open (max_sessions="
                                    f"{self.max_sessions}); retry later")
        sid = next(self._ids)
        self.active[sid] = session
        self.opened += 1
        try:
            yield sid
        finally:
            del self.active[sid]
            # Freed here, not when the stream's frames go: an ended stream's traceback keeps them alive.
            session.free()
            self._ended_since_trim += 1
            if self._reclaim is None and (self._ended_since_trim >= TRIM_EVERY or not self.active):
                self._schedule_give_back()

    def _schedule_give_back(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream finalized after its loop stopped: the process is ending anyway
            return
        self._reclaim = loop.call_later(_RECLAIM_DELAY_S, self._give_back)

    def _give_back(self) -> None:
        """Return the ended sessions' memory to the OS (see TRIM_EVERY)."""
        self._reclaim, self._ended_since_trim = None, 0
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.trims += 1

    def ended_by(self, reason: str) -> None:
        self.ended[reason] = self.ended.get(reason, 0) + 1
        if reason in ("idle", "drain"):
            self.evictions.labels(reason).inc()

    @property
    def nbytes(self) -> int:
        # Read by the metrics thread too: tuple() copies the values while holding the GIL.
        return sum(s.nbytes for s in tuple(self.active.values()))

    def close(self) -> None:
        """Drain: refuse new sessions and end the open ones (UNAVAILABLE), freeing their state."""
        self.closing = True
        for reader in list(self.waiting):
            reader.end("drain")

    def reader(self, requests: Any) -> SessionReader:
        """The reader of one session's request stream; call from the stream's own task."""
        return SessionReader(self, requests)


class SessionReader:
    """Reads a session's requests. While it waits, the idle TTL (a timer) or a drain cancels the wait
    and it raises SessionIdleError / SessionsClosedError; no task or wait set per message, and one
    timer per TTL period rather than one per message (it re-arms itself while the session is busy)."""

    def __init__(self, table: SessionTable, requests: Any) -> None:
        self._table, self._requests = table, requests
        self._task = asyncio.current_task()
        self._ended: str | None = None
        self._since: float | None = None  # when the current wait began (None: not waiting)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def ended(self) -> str | None:
        """Why the server ended the session (idle, drain), if it did."""
        return self._ended

    def _wait_began(self) -> None:
        """The session now waits on its client: the idle TTL counts."""
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._since + self._table.idle_ttl_s, self._expire)

    def _wait_ended(self) -> None:
        self._since = None
        self._table.waiting.discard(self)

    def writing(self) -> None:
        """An answer is on its way: until the client takes it (`written`) the session waits on the
        client too. A client that sends but never reads blocks that write once flow control is full;
        the idle TTL then ends the session (its call CANCELLED: the client does not read a status
        anyway), which would otherwise hold its slot, state and model version for good. A drain does
        not end a write: only waits for a message (`next`), which answer with a status."""
        self._wait_began()

    def written(self) -> None:
        self._wait_ended()

    async def next(self) -> Any:
        """The next message; None when the client closed its side."""
        if self._table.closing:
            raise SessionsClosedError("the server is shutting down; the session ended, reopen it elsewhere")
        self._wait_began()
        self._table.waiting.add(self)  # a drain ends this wait at once (table.close)
        try:
            return await anext(self._requests, None)
        except asyncio.CancelledError:
            if self._ended is None or self._task is None:
                raise  # the caller left, or its deadline passed
            self._task.uncancel()  # we cancelled the wait; the stream goes on to end with a status
            if self._ended == "drain":
                raise SessionsClosedError(
                    "the server is shutting down; the session ended, reopen it elsewhere") from None
            raise SessionIdleError(f"the session sent nothing for {self._table.idle_ttl_s:g}s (the server's "
                                   "idle TTL); its state was freed, open a new session") from None
        finally:
            self._wait_ended()

    def _expire(self) -> None:
        """The timer: end the wait if it has lasted the TTL, else re-arm for when it will have."""
        self._timer = None
        if self._since is None:  # answering a request: the next wait arms the timer again
            return
        due = self._since + self._table.idle_ttl_s
        loop = asyncio.get_running_loop()
        if loop.time() >= due:
            self.end("idle")
        else:
            self._timer = loop.call_at(due, self._expire)

    def close(self) -> None:
        """The stream ended: drop the timer (it holds this reader, and the reader the stream), and the
        reader from the table's waits (a stream closed mid-write never reached `written`)."""
        self._wait_ended()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def end(self, why: str) -> None:
        """Stop the wait for the next message (`why`: idle or drain)."""
        if self._task is not None and self._ended is None:
            self._ended = why
            self._task.cancel()


class _SessionCollector:
    def __init__(self, table: SessionTable) -> None:
        self._table = table

    def collect(self) -> Iterator[Any]:
        t = self._table
        yield GaugeMetricFamily("nextchar_sessions_active", "Typing sessions open now", value=len(t.active))
        yield GaugeMetricFamily("nextchar_session_state_bytes",
                                "Bytes of text and model state the open sessions hold", value=t.nbytes)
        yield CounterMetricFamily("nextchar_sessions_opened", "Sessions opened since start", value=t.opened)
        yield CounterMetricFamily("nextchar_sessions_refused", "Sessions refused at --max-sessions",
                                  value=t.refused)
