"""Threads for work that may outlast a shutdown (model loads), kept apart from the pools the interpreter
joins at exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def retrieved(future: asyncio.Future) -> None:
    """A done callback: read a future's outcome, which nobody awaits any more, so asyncio does not log
    an exception in it as never retrieved."""
    if not future.cancelled():
        future.exception()


DETACHED_PREFIX = "nextchar-detached-"  # daemon_thread's thread names
BATCHER_PREFIX = "nextchar-batcher-"  # scheduling.batcher's


def daemon_thread(fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """`fn(*args)` on a daemon thread of its own; its future. For work that may outlast a shutdown (a
    model load: a slow disk, a large model's warm-up): a pool's threads, asyncio's default executor's
    included, are joined when the process exits, so a load still running kept a drained server alive."""
    work: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not work.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as e:  # the awaiting side gets it, as from a pool
            work.set_exception(e)
        else:
            work.set_result(result)

    name = f"{DETACHED_PREFIX}{getattr(fn, '__name__', 'work')}"
    threading.Thread(target=run, name=name, daemon=True).start()
    return work


def detached_running() -> bool:
    """Is a thread that may be inside onnxruntime still running: a daemon_thread (a model load abandoned at
    shutdown) or a batcher whose engine call outlasted its close?"""
    return any(t.is_alive() and t.daemon and t.name.startswith((DETACHED_PREFIX, BATCHER_PREFIX))
               for t in threading.enumerate())


async def detached(fn: Callable[..., T], *args: Any) -> T:
    """`await fn(*args)` on a daemon thread of its own (daemon_thread); not asyncio.to_thread."""
    return await asyncio.wrap_future(daemon_thread(fn, *args))
