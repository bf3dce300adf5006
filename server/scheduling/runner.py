"""Runs blocking model work off the event loop: admission, deadlines, cancellation, coalesced text streams."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from nextchar.server.core.contract import ModelEngine
from nextchar.server.core.generation import Finished, FinishReason, GenerationRequest
from nextchar.server.scheduling.batcher import Batcher
from nextchar.server.scheduling.batching import BatchCore, Start, check_capacity
from nextchar.server.scheduling.channel import Channel
from nextchar.server.scheduling.policy import BatchingConfig
from nextchar.server.scheduling.threads import daemon_thread, retrieved

T = TypeVar("T")
log = logging.getLogger(__name__)
Clock = Callable[[], float]
_ALL = 1 << 62  # a `want` no text reaches: wait for the end
# Up to this many calls in flight, streams flush every flush_s; beyond, proportionally less often.
# Each gRPC message costs the server ~85 us of CPU (mostly grpc's own send path; measured at 64
# streams), so 4 (was 8) halves the message rate there: -6.5 % CPU per char, gaps 40 -> 80 ms.
STREAMS_PER_FLUSH = 4


class OverloadedError(RuntimeError):
    """Too many calls in flight; the client should back off and retry."""


class ShuttingDownError(RuntimeError):
    """The server is draining; the client should go to another replica."""


class DeadlineError(TimeoutError):
    """The call's deadline passed before the work finished; the work was stopped."""


@dataclass
class GenerationTrack:
    """One generation as the server sees it, handed to the runner's observers when it starts and
    updated in place by its worker thread (steps, stop request, finish)."""

    id: int
    max_new_chars: int
    started_at: float
    steps: int = 0                          # engine calls so far that advanced it (prefill + one per K chars)
    stop_requested_at: float | None = None  # when the caller went away (cancel) or the deadline hit
    finished_at: float | None = None
    reason: FinishReason | None = None


@dataclass(frozen=True)
class Outcome:
    """The end of a generation: the core's Finished event and how long the request waited to start."""

    finished: Finished
    queued_s: float


class _Job:
    """One generation's worker side: the stop flag, the deadline, the step count, the end."""

    def __init__(self, track: GenerationTrack, channel: Channel, deadline: float | None,
                 clock: Clock) -> None:
        self.track, self.channel, self.deadline, self._clock = track, channel, deadline, clock
        self.stop = threading.Event()
        self.started: float | None = None

    def past_deadline(self) -> bool:
        return self.deadline is not None and self._clock() >= self.deadline

    def stopped(self) -> bool:
        """Polled before every engine call: the caller left, or the deadline passed."""
        if self.stop.is_set():
            return True
        if self.past_deadline():
            self.track.stop_requested_at = self._clock()
            return True
        return False

    def counted_stop(self) -> bool:
        """`stopped` for the batcher, polled once per stream per engine call: so it counts calls too."""
        self.track.steps += 1
        return self.stopped()

    def finish(self, end: Finished | BaseException) -> None:
        self.track.finished_at = self._clock()
        if isinstance(end, Finished):
            timed_out = end.reason is FinishReason.CANCELLED and not self.stop.is_set()
            self.track.reason = FinishReason.DEADLINE if timed_out else end.reason
        self.channel.close(end)

    def run(self, engine: ModelEngine, request: GenerationRequest, config: BatchingConfig,
            start: Start | None = None) -> None:
        """Unbatched: a one-row BatchCore ticked on this worker thread, K chars per engine call."""
        self.started = self._clock()
        core = BatchCore(engine, config, clock=self._clock)
        try:
            core.submit(request, on_text=self.channel.put, on_end=self.finish, cancelled=self.counted_stop,
                        deadline=self.deadline, start=start)
        except BaseException as e:  # a bad request: handed to the event loop, which raises it
            self.finish(e)
            return
        try:
            while core.tick(self._clock()) is not None:
                pass
        except Exception as e:  # a bug outside an engine call: the caller gets it, the slot is freed
            log.exception("generation loop failed")
            core.fail_all(e)


class Runner:
    """Where requests meet threads. Every call holds one of `max_concurrent` slots (more are
    OverloadedError); while draining every new call is ShuttingDownError. Generations run either
    each on its own worker thread, or (with `batching`) through `instances` Batchers per model version;
    with `batch_variant_engines` False, only engines whose `batch_invariant` is True are batched,
    so a seeded text never depends on its batch mates (int8 engines then run unbatched)."""

    def __init__(self, max_concurrent: int, flush_s: float, flush_chars: int, *,
                 batching: BatchingConfig | None = None, batch_variant_engines: bool = True,
                 chars_per_call: BatchingConfig | None = None, instances: int = 1,
                 clock: Clock = time.perf_counter) -> None:
        self.max_concurrent = max_concurrent
        self.flush_s, self.flush_chars = flush_s, flush_chars
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="nextchar-model")
        self._ids = itertools.count(1)
        self.in_flight = 0
        self.draining = False
        self.closed = False  # close() was called: the server is stopping, calls waiting on threads let go
        self.cancelled_streams = 0  # generations stopped because the caller went away
        # Called with each generation's GenerationTrack as it starts (an injected observer: tests,
        # or an operator's probe); keep them cheap, they run on the event loop.
        self.observers: list[Callable[[GenerationTrack], None]] = []
        self._idle: asyncio.Event | None = None
        self._batching = batching  # None: every generation loops on its own worker thread
        # Unbatched generations still advance K chars per engine call (K settings from chars_per_call).
        k_settings = chars_per_call or batching or BatchingConfig()
        self._unbatched = dataclasses.replace(k_settings, max_batch_size=1, max_wait_s=0.0,
                                              max_active_streams=1, max_queue=0, burst_gap_s=0.0)
        self._batch_variant_engines = batch_variant_engines
        # Batchers per model version, each with its own worker thread: their engine calls run at
        # once (onnxruntime releases the GIL), so a model's streams use that many cores.
        self.instances = instances
        # Each lane decodes at most its share of max_active_streams; its own queue limit never binds
        # first (the Runner checks the model's limits over all lanes). One lane keeps them as configured.
        self._lane_config = batching if batching is None or instances == 1 else dataclasses.replace(
            batching, max_active_streams=-(-batching.max_active_streams // instances),
            max_queue=batching.max_active_streams + batching.max_queue)
        self._batchers: dict[int, list[Batcher]] = {}  # id(engine) -> its batchers
        self._lanes_lock = threading.Lock()  # _batchers: changed by forget from any thread

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

    async def call(self, fn: Callable[..., T], *args: Any, own_thread: bool = False) -> T:
        """Run blocking `fn(*args)` in a worker thread, holding a slot until the thread is done with it.
        `own_thread`: on a daemon thread of its own instead of the pool (a model load: see daemon_thread).

        A cancelled caller (deadline, disconnect) whose `fn` already runs keeps its slot, and so the limits
        its own caller releases while unwinding (per-client slot, memory budget, model version), until
        `fn` returns: a thread cannot be stopped, and letting go at once let a caller start any number of
        computations past --max-concurrent and made a drain report done while they ran. An `fn` not
        started yet never runs."""
        with self._admit():
            work = daemon_thread(fn, *args) if own_thread else self._executor.submit(fn, *args)
            try:
                return await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                if not work.cancel() and not self.closed:  # running: wait for it, through later cancels
                    done = asyncio.wrap_future(work)
                    done.add_done_callback(retrieved)  # its outcome is nobody's now: not logged as lost
                    while not work.done():
                        try:
                            await asyncio.wait((done,))
                        except asyncio.CancelledError:
                            if self.closed:  # but not shutdown's: the thread is left to end with the process
                                break
                raise

    async def generate(self, engine: ModelEngine, request: GenerationRequest, deadline_s: float | None = None,
                       *, live: bool = True,
                       start: Start | None = None) -> AsyncGenerator[str | Outcome, None]:
        """Stream one generation: text pieces (coalesced: at most every flush_s, stretched past
        STREAMS_PER_FLUSH calls in flight, or flush_chars once the first char is out), then one
        Outcome. Stops the work at once when the caller goes away. `live=False` (a unary call) wakes
        the event loop only at the end, since nobody reads the pieces before it. `start`: resume from
        a state and its logits instead of reading the prompt (BatchCore.submit), e.g. a session's."""
        with self._admit():
            loop = asyncio.get_running_loop()
            arrived = self._clock()
            track = GenerationTrack(next(self._ids), request.max_new_chars, started_at=arrived)
            for observe in self.observers:
                observe(track)
            deadline = None if deadline_s is None else arrived + deadline_s
            job = _Job(track, Channel(loop), deadline, self._clock)
            lane: Batcher | None = None
            if self.batches(engine):
                lane = self._batcher(engine)
                # Decoder errors (bad prompt) raise here, before anything was streamed.
                lane.submit(request, on_text=job.channel.put, on_end=job.finish,
                            cancelled=job.counted_stop, deadline=deadline, start=start)
                job.started = self._clock()
            else:
                loop.run_in_executor(self._executor, job.run, engine, request, self._unbatched, start)
            first, left = True, False
            try:
                while True:
                    if not live:
                        text, end = await job.channel.take(_ALL, None)
                    else:
                        text, end = await job.channel.take(1 if first else self.flush_chars,
                                                           None if first else self._flush_wait())
                    if text:
                        first = False
                        yield text
                    if end is not None:
                        break
            except (asyncio.CancelledError, GeneratorExit):
                if not job.past_deadline():  # else gRPC itself ended the call at its deadline
                    self.cancelled_streams += 1
                track.stop_requested_at = self._clock()
                left = True
                raise
            finally:
                job.stop.set()
                if left and lane is not None:  # a queued stream leaves the queue now, not at a timed wake
                    lane.wake()
            if isinstance(end, BaseException):
                raise end
            if end.reason is FinishReason.CANCELLED and job.past_deadline():
                raise DeadlineError(
                    f"deadline of {deadline_s:.3f}s passed after {end.usage.generated_chars} of "
                    f"max_new_chars={request.max_new_chars} characters; generation stopped")
            yield Outcome(end, (job.started or arrived) - arrived)

    def batches(self, engine: ModelEngine) -> bool:
        """Do generations on `engine` go through a batcher?"""
        return self._batching is not None and (
            self._batch_variant_engines or engine.batch_invariant is True)

    def _flush_wait(self) -> float:
        """flush_s, stretched when many calls are in flight: every message costs the event loop (and
        the GIL the batcher needs) about what a decode row costs, so at 64 streams of 1-char messages
        the loop, not the model, limited throughput (BENCHMARKS.md). One stream stays as live as before."""
        return self.flush_s * max(1.0, self.in_flight / STREAMS_PER_FLUSH)

    @property
    def batchers(self) -> list[Batcher]:
        """The batchers started so far (`instances` per model version used), e.g. for their `core.stats`
        (read by the metrics thread too)."""
        with self._lanes_lock:
            return [b for lanes in self._batchers.values() for b in lanes]

    def _batcher(self, engine: ModelEngine) -> Batcher:
        """The least loaded of `engine`'s batchers (started here, the first time), after the model's
        stream limits are checked over all of them (CapacityError names the configured limits)."""
        c = self._batching
        assert c is not None and self._lane_config is not None, "only batched engines have batchers"
        with self._lanes_lock:
            lanes = self._batchers.setdefault(id(engine), [])
            for i in range(self.instances):
                if i < len(lanes) and lanes[i].core.closed is None:
                    continue
                lane = Batcher(engine, self._lane_config, clock=self._clock, name=f"{engine.name}-{i}")
                if i == len(lanes):
                    lanes.append(lane)
                else:  # its worker died (a bug; logged): a fresh one instead
                    log.warning("batcher %s-%d had stopped; starting a new one", engine.name, i)
                    lanes[i] = lane
        if len(lanes) == 1:
            return lanes[0]  # its core checks the limits itself
        counts = [b.core.counts() for b in lanes]
        check_capacity(sum(a for a, _ in counts), sum(q for _, q in counts), c)
        return lanes[min(range(len(lanes)), key=lambda i: sum(counts[i]))]

    def forget(self, engine: ModelEngine) -> None:
        """`engine`'s model version was unloaded after its last call ended: stop its batchers, if any.
        Called on the event loop (a last call's release) or a worker thread (an Admin unload)."""
        with self._lanes_lock:
            lanes = self._batchers.pop(id(engine), [])
        for batcher in lanes:
            # No join: the worker ends after its current tick, and no call is left on it.
            batcher.close(timeout=0)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls; wait up to `timeout` s for running ones. True if all finished in time."""
        self.draining = True
        if self.in_flight == 0:
            return True
        if self._idle is None:  # a second drain waits on the same event
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.closed = True
        for batcher in self.batchers:
            batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
