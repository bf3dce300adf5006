"""The batcher's worker thread: a BatchCore ticked by its own thread, fed from any thread or asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from nextchar.server.core.contract import ModelEngine
from nextchar.server.core.generation import (
    Decoder,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextChunk,
)
from nextchar.server.scheduling.batching import BatchCore, BatcherClosedError, OnEnd, OnText, Start
from nextchar.server.scheduling.policy import BatchingConfig
from nextchar.server.scheduling.threads import BATCHER_PREFIX

log = logging.getLogger(__name__)


class Batcher:
    """A BatchCore driven by its own worker thread; `submit` and `stream` may be called from anywhere."""

    def __init__(self, engine: ModelEngine, config: BatchingConfig | None = None, *,
                 clock: Callable[[], float] = time.perf_counter, name: str = "") -> None:
        self.core = BatchCore(engine, config or BatchingConfig(), clock=clock)
        self._clock = clock
        if engine.batch_invariant is False:
            log.warning("batcher %s: the engine is not batch-invariant (e.g. int8): a seeded text may "
                        "differ with its batch mates", name)
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"{BATCHER_PREFIX}{name}", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, *, on_text: OnText, on_end: OnEnd,
               cancelled: Callable[[], bool] | None = None, deadline: float | None = None,
               start: Start | None = None) -> Decoder:
        """Queue `request` (`start`: see BatchCore.submit). Callbacks run on the worker thread:
        on_text(text) per piece (the echo first, on the caller's thread), then exactly one
        on_end(Finished or the exception that failed it)."""
        if self._closing:  # the core also refuses once closed; this is the early, common case
            raise BatcherClosedError("the batcher is shutting down")
        decoder = self.core.submit(request, on_text=on_text, on_end=on_end, cancelled=cancelled,
                                   deadline=deadline, start=start)
        self.wake()
        return decoder

    async def stream(self, request: GenerationRequest, *,
                     cancelled: Callable[[], bool] | None = None) -> AsyncIterator[GenerationEvent]:
        """TextChunk events then one Finished; raises what failed the stream.

        Leaving early cancels the stream at the next step once the generator is closed: wrap it in
        `contextlib.aclosing(...)` so that happens at once rather than when it is garbage collected.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        left = threading.Event()
        self.submit(
            request,
            on_text=lambda text: loop.call_soon_threadsafe(queue.put_nowait, TextChunk(text)),
            on_end=lambda end: loop.call_soon_threadsafe(queue.put_nowait, end),
            cancelled=lambda: left.is_set() or (cancelled is not None and cancelled()),
        )
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            left.set()
            self.wake()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the worker; streams still running end with BatcherClosedError."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                delay = self.core.tick(self._clock())
            except Exception as e:  # a bug outside an engine call: end every stream, refuse new ones
                log.exception("batcher tick failed; failing its streams")
                with self._wake:
                    self._closing = True
                self.core.fail_all(e)
                return
            with self._wake:
                if self._closing:
                    break
                if delay == 0.0 or self.core.has_arrivals:
                    continue
                self._wake.wait(delay)  # None: until a submit, a cancel or close notifies us
        self.core.fail_all(BatcherClosedError("the batcher shut down before this generation finished"))
