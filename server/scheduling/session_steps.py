"""Session steps of one engine that arrive together share one engine call (per length), off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from nextchar.server.core.contract import State, concat_states, take
from nextchar.server.core.prefill import prefill

Result = tuple[np.ndarray, State]  # (last logits row float32[V], state after the step)
Offload = Callable[..., Awaitable[Any]]  # run a blocking fn(*args) in a worker thread (Runner.call)


class StepCoalescer:
    """`await step(engine, tokens, state)` for many sessions; no timer and no added wait.

    The first step of an idle engine starts at once; steps that arrive while an engine call runs wait
    for it to end and then go together: one engine call per token length, at most `max_rows` rows.
    Engines for which `may_batch(engine)` is False (results that depend on batch mates) run one row
    per call, so a session's predictions never depend on other sessions.
    """

    def __init__(self, offload: Offload, max_rows: int, may_batch: Callable[[Any], bool]) -> None:
        self._offload, self._max_rows, self._may_batch = offload, max_rows, may_batch
        self._waiting: dict[int, list[tuple[np.ndarray, State | None, asyncio.Future]]] = {}
        self._busy: set[int] = set()
        self._tasks: set[asyncio.Task] = set()  # the running drains (the loop keeps only weak references)
        self.calls = 0  # engine calls made
        self.rows = 0   # session steps they carried

    async def step(self, engine: Any, tokens: np.ndarray, state: State | None) -> Result:
        """tokens: int64[T] (T >= 1) from `state` (None: the zero state) -> (logits float32[V], state)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._waiting.setdefault(id(engine), []).append((tokens, state, done))
        if id(engine) not in self._busy:
            self._start(engine)
        return await done

    def _start(self, engine: Any) -> None:
        self._busy.add(id(engine))
        task = asyncio.get_running_loop().create_task(self._drain(engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, engine: Any) -> None:
        key = id(engine)
        try:
            while self._waiting.get(key):
                steps = [s for s in self._waiting.pop(key) if not s[2].done()]  # drop callers that left
                groups: dict[int, list] = {}
                for s in steps:
                    groups.setdefault(s[0].size, []).append(s)
                rows = self._max_rows if self._may_batch(engine) else 1
                batches = [g[i:i + rows] for g in groups.values() for i in range(0, len(g), rows)]
                try:
                    results = await self._offload(_run_batches, engine, [[s[:2] for s in b] for b in batches])
                except BaseException as e:  # handed to every waiting caller, who raises it
                    for b in batches:
                        for _, _, done in b:
                            if not done.done():
                                done.set_exception(e)
                    if isinstance(e, asyncio.CancelledError):
                        raise
                    continue
                self.calls += len(batches)
                for b, out in zip(batches, results, strict=True):
                    self.rows += len(b)
                    for (_, _, done), result in zip(b, out, strict=True):
                        if not done.done():
                            done.set_result(result)
        finally:
            self._busy.discard(key)
            # Anything that arrived after the last check was not picked up: start again for it.
            if self._waiting.get(key):
                self._start(engine)


def _run_batches(engine: Any, batches: list[list[tuple[np.ndarray, State | None]]]) -> list[list[Result]]:
    """On a worker thread: one chunked prefill per batch of equal-length rows (core.prefill: engine calls
    of at most PREFILL_CHUNK positions keeping only the last logits, so a long append's memory follows
    the configuration, not its length); rows copied out of the batch."""
    out = []
    for batch in batches:
        tokens = np.stack([t for t, _ in batch]).astype(np.int64, copy=False)
        zero = engine.initial_state(1)
        states = [s if s is not None else zero for _, s in batch]
        last, new = prefill(engine, tokens, concat_states(states))
        out.append([(last[i].copy(), tuple(s.copy() for s in take(new, slice(i, i + 1))))
                    for i in range(len(batch))])
    return out
