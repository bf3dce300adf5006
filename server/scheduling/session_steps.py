"""Session steps of one engine that arrive together share one engine call (per length); small ones run
on the event loop itself, the rest on a worker thread."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from nextchar.server.core.contract import State, concat_states, take
from nextchar.server.core.prefill import prefill

Result = tuple[np.ndarray, State]  # (last logits row float32[V], state after the step)
Offload = Callable[..., Awaitable[Any]]  # run a blocking fn(*args) in a worker thread (Runner.call)
Batch = list[tuple[np.ndarray, State | None]]

# A call expected to take at most this long runs on the event loop's thread: handing a one-char step to
# a worker thread and back (two wake-ups and a future) costs more CPU than the step itself
# (bench_sessions: 0.50 -> 0.35 ms of server CPU per keystroke, and lower latency).
INLINE_S = 0.0005
# ... and only for steps of at most this many chars: a paste's positions run one after another, so the
# cost per row-position measured on keystrokes (rows side by side) would understate its call.
INLINE_MAX_CHARS = 8


class StepCoalescer:
    """`await step(engine, tokens, state)` for many sessions.

    The first step of an idle engine goes at the loop's next turn, with the steps queued in the same
    turn; steps that arrive while an engine call runs wait for it to end and then go together: one
    engine call per token length, at most `max_rows` rows. An engine error fails that call's steps only.
    Engines for which `may_batch(engine)` is False (results that depend on batch mates) run one row
    per call, so a session's predictions never depend on other sessions.

    A call runs inline (on the event loop, which it blocks while onnxruntime runs, the GIL released)
    when its steps are at most INLINE_MAX_CHARS chars and the engine's measured seconds per
    row-position times its rows x positions is at most `inline_s`; until an engine has been measured
    (its first call) and for longer calls, a worker (`offload`, which admits the call itself). Before
    an inline call, `check()` (e.g. the runner's "not draining") may refuse it, as the offload would.

    With `wait_s` (--session-wait-ms), a step that finds the engine idle, its last call having carried
    another caller's steps less than wait_s ago (other sessions are typing), waits wait_s for company:
    fewer, fuller calls for that much latency. A lone typist never waits.
    """

    def __init__(self, offload: Offload, max_rows: int, may_batch: Callable[[Any], bool], *,
                 inline_s: float = INLINE_S, wait_s: float = 0.0,
                 check: Callable[[], None] = lambda: None) -> None:
        self._offload, self._max_rows, self._may_batch = offload, max_rows, may_batch
        self.inline_s, self.wait_s, self._check = inline_s, wait_s, check
        self._waiting: dict[int, list[tuple[np.ndarray, State | None, asyncio.Future, int]]] = {}
        self._busy: set[int] = set()
        self._tasks: set[asyncio.Task] = set()  # the running drains (the loop keeps only weak references)
        # Seconds per row-position of each engine's calls, smoothed; when its last flush began and
        # whose steps (caller ids) it carried. Weak: an unloaded version leaves.
        self._cost: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._last_flush: weakref.WeakKeyDictionary[Any, tuple[float, frozenset[int]]] = \
            weakref.WeakKeyDictionary()
        self.calls = 0  # engine calls made
        self.rows = 0   # session steps they carried
        self.inline_calls = 0  # of the calls, those run on the event loop

    async def step(self, engine: Any, tokens: np.ndarray, state: State | None, *,
                   caller: object = None) -> Result:
        """tokens: int64[T] (T >= 1) from `state` (None: the zero state) -> (logits float32[V], state).
        `caller`: who steps (its session), so its own earlier calls never make it wait."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self._waiting.setdefault(id(engine), []).append((tokens, state, done, id(caller)))
        if id(engine) not in self._busy:
            self._busy.add(id(engine))
            # Soon, not now: the steps queued in this turn of the loop go together; while other
            # sessions are typing on the model (see the class), those that come within wait_s too.
            last = self._last_flush.get(engine)
            if self.wait_s and last is not None and loop.time() - last[0] < self.wait_s \
                    and last[1] - {id(caller)}:
                loop.call_later(self.wait_s, self._flush, engine)
            else:
                loop.call_soon(self._flush, engine)
        return await done

    def _inline(self, engine: Any, batches: list[Batch]) -> bool:
        cost = self._cost.get(engine)
        return cost is not None and all(b[0][0].size <= INLINE_MAX_CHARS for b in batches) \
            and cost * sum(len(b) * b[0][0].size for b in batches) <= self.inline_s

    def _count(self, engine: Any, batches: list[Batch], seconds: float) -> None:
        cost = seconds / sum(len(b) * b[0][0].size for b in batches)
        old = self._cost.get(engine)
        self._cost[engine] = cost if old is None else 0.8 * old + 0.2 * cost
        self.calls += len(batches)
        self.rows += sum(len(b) for b in batches)

    def _flush(self, engine: Any) -> None:
        """On the loop: the engine's waiting steps in calls, inline or (a task) on a worker thread."""
        key = id(engine)
        steps = [s for s in self._waiting.pop(key, ()) if not s[2].done()]  # drop callers that left
        if not steps:
            self._busy.discard(key)
            return
        loop = asyncio.get_running_loop()
        self._last_flush[engine] = (loop.time(), frozenset(s[3] for s in steps))
        groups: dict[int, list] = {}
        for s in steps:
            groups.setdefault(s[0].size, []).append(s)
        try:
            rows = self._max_rows if self._may_batch(engine) else 1
            batches = [g[i:i + rows] for g in groups.values() for i in range(0, len(g), rows)]
            work = [[s[:2] for s in b] for b in batches]
            if not self._inline(engine, work):
                task = loop.create_task(self._offloaded(engine, batches, work))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self._check()
            results, seconds = _timed(engine, work)
        except Exception as e:  # refused, or a bug: these callers get it; the engine is not left busy
            _settle([steps], e)
            self._busy.discard(key)
            return
        self._count(engine, work, seconds)
        self.inline_calls += len(work)
        _settle(batches, results)
        self._busy.discard(key)  # the loop was blocked: nothing arrived meanwhile

    async def _offloaded(self, engine: Any, batches: list, work: list[Batch]) -> None:
        try:
            results, seconds = await self._offload(_timed, engine, work)
        except BaseException as e:  # the hand-off failed (e.g. no slot): every waiting caller gets it
            _settle(batches, e)
            if isinstance(e, asyncio.CancelledError):
                raise
        else:
            self._count(engine, work, seconds)
            _settle(batches, results)
        finally:
            # Steps that arrived during the call go next, together.
            if self._waiting.get(id(engine)):
                asyncio.get_running_loop().call_soon(self._flush, engine)
            else:
                self._busy.discard(id(engine))


def _settle(batches: list, outcome: list[list[Result] | BaseException] | BaseException) -> None:
    """Hand each caller its result, or the exception that failed its batch (or every batch)."""
    for i, b in enumerate(batches):
        out = outcome if isinstance(outcome, BaseException) else outcome[i]
        for j, item in enumerate(b):
            done = item[2]
            if done.done():
                continue
            if isinstance(out, BaseException):
                done.set_exception(out)
            else:
                done.set_result(out[j])


def _timed(engine: Any, batches: list[Batch]) -> tuple[list[list[Result] | BaseException], float]:
    """Each batch's results, or the exception that failed it (only its own callers get it); seconds."""
    started = time.perf_counter()
    out: list[list[Result] | BaseException] = []
    for batch in batches:
        try:
            out.append(_run_batch(engine, batch))
        except Exception as e:
            out.append(e)
    return out, time.perf_counter() - started


def _run_batch(engine: Any, batch: Batch) -> list[Result]:
    """One chunked prefill of a batch of equal-length rows (core.prefill: engine calls of at most
    PREFILL_CHUNK positions keeping only the last logits, so a long append's memory follows the
    configuration, not its length); rows copied out of the batch."""
    if len(batch) == 1:  # a lone row: no stacking; its outputs are its own unless views (padded rows)
        tokens, state = batch[0]
        last, new = prefill(engine, tokens[None].astype(np.int64, copy=False),
                            state if state is not None else engine.initial_state(1))
        return [(last[0], tuple(s if s.base is None else s.copy() for s in new))]
    tokens = np.stack([t for t, _ in batch]).astype(np.int64, copy=False)
    zero = engine.initial_state(1)
    states = [s if s is not None else zero for _, s in batch]
    last, new = prefill(engine, tokens, concat_states(states))
    return [(last[i].copy(), tuple(s.copy() for s in take(new, slice(i, i + 1)))) for i in range(len(batch))]
