"""Runs blocking model work off the event loop: admission, deadlines, cancellation, coalesced text streams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from nextchar.server.generation import Finished, FinishReason, GenerationRequest, TextChunk, generate

T = TypeVar("T")
Clock = Callable[[], float]


class OverloadedError(RuntimeError):
    """Too many calls in flight; the client should back off and retry."""


class ShuttingDownError(RuntimeError):
    """The server is draining; the client should go to another replica."""


class DeadlineError(TimeoutError):
    """The call's deadline passed before the work finished; the work was stopped."""


@dataclass
class GenerationTrack:
    """One generation as seen from the server, for tests and metrics (written by its worker thread)."""

    id: int
    max_new_chars: int
    started_at: float
    steps: int = 0                          # engine calls so far: prefill + one per generated char
    stop_requested_at: float | None = None  # when the caller went away (cancel) or the deadline hit
    finished_at: float | None = None
    reason: FinishReason | None = None


@dataclass(frozen=True)
class Outcome:
    """The end of a generation: the core's Finished event and how long the request waited to start."""

    finished: Finished
    queued_s: float


class _Counting:
    """The engine as the generation loop sees it, counting steps into the request's track."""

    def __init__(self, engine: Any, track: GenerationTrack) -> None:
        self._engine, self._track = engine, track
        self.vocab = engine.vocab
        self.vocab_index = getattr(engine, "vocab_index", None)

    def initial_state(self, batch: int) -> Any:
        return self._engine.initial_state(batch)

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        self._track.steps += 1
        return self._engine.step(tokens, state)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _Channel:
    """Worker thread -> event loop. Text accumulates; the loop is woken only when it waits and
    enough text (or the end) has arrived, so a fast generation costs one wake-up per message."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._chars = 0
        self._end: Finished | BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._want = 1

    def put(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self._chars += len(text)
            waiter = self._waiter if self._chars >= self._want else None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    def close(self, end: Finished | BaseException) -> None:
        with self._lock:
            self._end = end
            waiter = self._waiter
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    async def take(self, want: int, max_wait: float | None) -> tuple[str, Finished | BaseException | None]:
        """Wait for `want` characters or the end; once `max_wait` s passed, any text at all will do."""
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            with self._lock:
                waiter = self._waiter
            if waiter is not None:
                _resolve(waiter)

        timer = self._loop.call_later(max_wait, expire) if max_wait is not None else None
        try:
            while True:
                with self._lock:
                    need = 1 if expired else want
                    if self._end is not None or self._chars >= need:
                        text, self._parts, self._chars = "".join(self._parts), [], 0
                        return text, self._end
                    self._waiter, self._want = self._loop.create_future(), need
                    waiter = self._waiter
                await waiter
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                self._waiter = None


class Runner:
    """Where requests meet threads. Every call holds one of `max_concurrent` slots (more are
    OverloadedError); while draining every new call is ShuttingDownError."""

    def __init__(self, max_concurrent: int, flush_s: float, flush_chars: int, *,
                 clock: Clock = time.perf_counter, track_history: int = 256) -> None:
        self.max_concurrent = max_concurrent
        self.flush_s, self.flush_chars = flush_s, flush_chars
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="nextchar-model")
        self._ids = itertools.count(1)
        self.in_flight = 0
        self.draining = False
        self.cancelled_streams = 0  # generations stopped because the caller went away
        self.tracks: deque[GenerationTrack] = deque(maxlen=track_history)
        self._idle: asyncio.Event | None = None

    def ensure_open(self) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry against another instance")

    @contextlib.contextmanager
    def _admit(self) -> Iterator[None]:
        self.ensure_open()
        if self.in_flight >= self.max_concurrent:
            raise OverloadedError(
                f"{self.in_flight} calls in flight (max_concurrent={self.max_concurrent}); retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking `fn(*args)` in a worker thread, holding a slot."""
        with self._admit():
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(self, engine: Any, request: GenerationRequest,
                       deadline_s: float | None = None) -> AsyncIterator[str | Outcome]:
        """Stream one generation: text pieces (coalesced: at most every flush_s or flush_chars once the
        first char is out), then one Outcome. Stops the worker at once when the caller goes away."""
        with self._admit():
            loop = asyncio.get_running_loop()
            arrived = self._clock()
            deadline = None if deadline_s is None else arrived + deadline_s
            track = GenerationTrack(next(self._ids), request.max_new_chars, started_at=arrived)
            self.tracks.append(track)
            stop = threading.Event()
            channel = _Channel(loop)
            started: list[float] = []

            def stopped() -> bool:
                if stop.is_set():
                    return True
                if deadline is not None and self._clock() >= deadline:
                    track.stop_requested_at = self._clock()
                    return True
                return False

            def work() -> None:
                started.append(self._clock())
                end: Finished | BaseException
                try:
                    events = generate(_Counting(engine, track), request, clock=self._clock, cancelled=stopped)
                    for event in events:
                        if isinstance(event, TextChunk):
                            channel.put(event.text)
                        else:
                            end = event
                except BaseException as e:  # handed to the event loop, which raises it for the caller
                    end = e
                track.finished_at = self._clock()
                if isinstance(end, Finished):
                    timed_out = end.reason is FinishReason.CANCELLED and not stop.is_set()
                    track.reason = FinishReason.DEADLINE if timed_out else end.reason
                channel.close(end)

            loop.run_in_executor(self._executor, work)
            first = True
            try:
                while True:
                    text, end = await channel.take(1 if first else self.flush_chars,
                                                   None if first else self.flush_s)
                    if text:
                        first = False
                        yield text
                    if end is not None:
                        break
            except (asyncio.CancelledError, GeneratorExit):
                track.stop_requested_at = self._clock()
                if deadline is None or track.stop_requested_at < deadline:  # else gRPC enforced the deadline
                    self.cancelled_streams += 1
                raise
            finally:
                stop.set()
            if isinstance(end, BaseException):
                raise end
            if end.reason is FinishReason.CANCELLED and deadline is not None and self._clock() >= deadline:
                raise DeadlineError(
                    f"deadline of {deadline_s:.3f}s passed after {end.usage.generated_chars} of "
                    f"max_new_chars={request.max_new_chars} characters; generation stopped")
            yield Outcome(end, started[0] - arrived)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait up to `timeout` s for running ones. True if all finished in time."""
        self.draining = True
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
