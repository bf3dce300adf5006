"""A generation's text on its way from a worker thread to the event loop, woken once per message."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from nextchar.server.core.generation import Finished


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _wake(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future) -> None:
    """From a worker thread; a closed loop (the server stopped past its grace period) has nobody to wake."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_resolve, waiter)


class Channel:
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
            _wake(self._loop, waiter)

    def close(self, end: Finished | BaseException) -> None:
        with self._lock:
            self._end = end
            waiter = self._waiter
        if waiter is not None:
            _wake(self._loop, waiter)

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
