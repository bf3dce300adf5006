"""Continuous batching: one model's concurrent generations advanced together, K chars per engine call.

What is computed stays in `generation.Decoder` (stop rules) and the engine's generation graph
(sampling, in the graph, from per-row uniforms `philox_uniforms(seed, draw index)`); this module only
decides which streams share an engine call and how many chars (K) each call advances them. Per model
version, `--model-instances` `batcher.Batcher`s each drive a BatchCore on a worker thread (the Runner
hands each new stream to the least loaded one):

    batcher = Batcher(engine, BatchingConfig(max_batch_size=32))
    batcher.submit(request, on_text=..., on_end=..., cancelled=...)   # from any thread

Each tick of the worker: new requests are prefilled (one engine call per group of equal prompt
length, padding would change a recurrent state; the call also samples each one's first char, K=1, so
the first char costs one prefill), then every active stream advances K chars in engine calls of at
most `max_batch_size` rows (state rows gathered, stepped, scattered back). K (`chars_per_call`) is 1
while arrivals wait, then doubles per call up to `max_chars_per_call`, bounded so one call lasts about
`max_call_s` (a cancel or a deadline is seen between calls) and by the chars the rows still need.
A stop sequence inside a chunk ends the stream there (the Decoder truncates; the rest is dropped).
Finished and cancelled streams leave between calls, new ones join after their prefill; an arrival at
an idle batcher waits up to `max_wait_s` for company, and a burst (arrivals less than `burst_gap_s`
apart) is admitted once it pauses, so its prefills share calls (policy.admit_count). An engine error
fails only the streams of that call. `BatchCore.tick(now)` is the whole scheduling logic, synchronous,
driven by the caller's clock.

Reproducibility: char i of a stream is sampled with the uniform (seed, i) by one float64 rule, so its
text is the same whatever K and, when `engine.batch_invariant` (measured by Engine.warmup; true for
fp32 LSTM/GRU/RNN on onnxruntime 1.32 CPU), whatever its batch mates; int8 engines are batch-dependent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nextchar.server.core.contract import ModelEngine, State, concat_states, take
from nextchar.server.core.generation import Decoder, Finished, FinishReason, GenerationRequest
from nextchar.server.core.prefill import PREFILL_CHUNK, prefill
from nextchar.server.core.sampling import philox_uniforms
from nextchar.server.scheduling.policy import BatchingConfig, admit_count, chars_per_call, prefill_groups

log = logging.getLogger(__name__)

OnText = Callable[[str], object]  # return values are ignored
OnEnd = Callable[[Finished | BaseException], object]


class CapacityError(RuntimeError):
    """The batcher is full; `limit` names the setting that refused the request (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


def check_capacity(active: int, queued: int, config: BatchingConfig) -> None:
    """CapacityError when `active` decoding and `queued` waiting streams fill the configured limits."""
    c = config
    if active + queued >= c.max_active_streams + c.max_queue:
        limit = "max_queue" if c.max_queue else "max_active_streams"
        raise CapacityError(limit, (
            f"batcher full: {active} streams active (max_active_streams={c.max_active_streams}) and "
            f"{queued} waiting (max_queue={c.max_queue}); retry later"))


def _check_start(start: Start, engine: ModelEngine) -> None:
    """A start that does not fit the engine fails its own request here, not the batch it would join."""
    state, logits = start
    want = [z.shape for z in engine.initial_state(1)]
    if [np.shape(x) for x in state] != want or np.shape(logits) != (engine.vocab_size,):
        raise ValueError(f"start must be a state {want} and logits ({engine.vocab_size},), got "
                         f"{[np.shape(x) for x in state]} and {np.shape(logits)}")


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down (UNAVAILABLE: the model version was unloaded or the server stops)."""


# Where a stream resumes instead of reading its prompt: (the state after the prompt, float32[L, 1, H]
# each, and the last position's logits, float32[V]), e.g. a typing session's.
Start = tuple[State, np.ndarray]


@dataclass(eq=False)
class _Stream:
    decoder: Decoder
    on_text: OnText
    on_end: OnEnd
    cancelled: Callable[[], bool] | None
    arrival: float
    deadline: float | None = None
    state: tuple[State, int] | None = None  # (the batch state of its last engine call, its row)
    done: bool = False
    start: Start | None = None

    @property
    def remaining(self) -> int:
        return self.decoder.request.max_new_chars - self.decoder.generated_chars


@dataclass
class BatchStats:
    prefill_calls: int = 0
    decode_calls: int = 0
    decode_rows: int = 0           # sum of batch sizes over decode calls
    decode_chars: int = 0          # sum of K over decode calls
    engine_seconds: float = 0.0    # time inside engine.step
    failed_calls: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # decode batch size -> calls


class BatchCore:
    """The scheduler's state and one tick of it; not thread-safe except `submit` (see Batcher)."""

    def __init__(self, engine: ModelEngine, config: BatchingConfig, *, clock: Callable[[], float]) -> None:
        self.engine, self.config, self.clock = engine, config, clock
        self._inbox: deque[_Stream] = deque()  # appended by any thread, drained by tick()
        self._lock = threading.Lock()
        self.waiting: list[_Stream] = []
        self.active: list[_Stream] = []
        # Admitted, prefill step not done: they hold active slots. Moved under _lock, like the
        # count in submit, because callbacks (a first char, an end) reach clients mid-tick.
        self._prefilling: set[_Stream] = set()
        self.stats = BatchStats()
        self.closed: BaseException | None = None  # set by fail_all: later submits are refused
        self.k = 1                         # the last decode call's K
        self.seconds_per_char = 0.0        # one decode iteration, smoothed over calls
        self._previous: float | None = None  # arrival time of the newest admitted stream (bursts)
        self._held: float | None = None      # seconds until waiting arrivals (a burst) are admitted

    @property
    def pending(self) -> int:
        return len(self._inbox) + len(self.waiting)

    @property
    def has_arrivals(self) -> bool:
        return bool(self._inbox)

    @property
    def active_count(self) -> int:
        """Streams admitted and not ended (prefilling or decoding); the caller holds `_lock`."""
        return sum(not s.done for s in (*self._prefilling, *self.active))

    def counts(self) -> tuple[int, int]:
        """(active_count, pending), read together from any thread."""
        with self._lock:
            return self.active_count, self.pending

    def submit(self, request: GenerationRequest, *, on_text: OnText, on_end: OnEnd,
               cancelled: Callable[[], bool] | None = None, deadline: float | None = None,
               start: Start | None = None) -> Decoder:
        """Queue a request (thread-safe). Raises request errors and CapacityError synchronously.
        `deadline` (on the core's clock) only shortens K near it; `cancelled` ends the stream.
        With `start`, the prompt is not read: its state and last logits are given (a session's text),
        the first char is sampled from those logits and the stream joins the decoding ones at once."""
        decoder = Decoder(request, self.engine.vocab, self.engine.vocab_index, clock=self.clock)
        if start is not None:
            _check_start(start, self.engine)
        c = self.config
        with self._lock:
            if self.closed is not None:
                raise BatcherClosedError(f"the batcher is shut down: {self.closed}")
            check_capacity(self.active_count, self.pending, c)
            if request.echo:
                on_text(decoder.echo_text)
            self._inbox.append(_Stream(decoder, on_text, on_end, cancelled, arrival=self.clock(),
                                       deadline=deadline, start=start))
        return decoder

    def tick(self, now: float) -> float | None:
        """Admit, prefill, then advance every active stream by K chars. Returns seconds until the
        next tick is due (0 = at once), or None when idle until the next submit."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        self.waiting = [s for s in self.waiting if not self._left(s)]
        self.active = [s for s in self.active if not self._left(s)]
        self._resume_waiting()
        plain = [s for s in self.waiting if s.start is None]  # resumed ones left: no slot is theirs yet
        n, self._held = admit_count([s.arrival for s in plain], len(self.active), now, self.config,
                                    self._previous)
        admitted = plain[:n]
        if admitted:
            with self._lock:
                chosen = set(admitted)
                self.waiting = [s for s in self.waiting if s not in chosen]
                self._prefilling.update(admitted)
            self._previous = admitted[-1].arrival
        lengths = [s.decoder.prompt_tokens.size for s in admitted]
        groups = prefill_groups(lengths, self.config.max_batch_size)
        started, decoding = self.clock(), bool(self.active)  # streams that were decoding before this tick
        for g, group in enumerate(groups):
            others = decoding or self._inbox or self.waiting  # (a glance: the lock is not needed for it)
            if g and others and self.clock() - started >= self.config.max_call_s:
                # Streams already decoding, and callers still waiting, wait about one call for these
                # arrivals, not for all their prefills: the rest go first in the next tick.
                rest = sorted((admitted[i] for later in groups[g:] for i in later), key=lambda s: s.arrival)
                with self._lock:
                    self._prefilling.difference_update(rest)
                    self.waiting = rest + self.waiting
                break
            self._prefill([admitted[i] for i in group])
        self.active = [s for s in self.active if not self._left(s)]  # one gone during the prefills: no call
        size = self.config.max_batch_size
        for start in range(0, len(self.active), size):
            self._decode(self.active[start:start + size], now)
        self.active = [s for s in self.active if not s.done]
        if self.active:
            return 0.0
        if not self.waiting:
            return None
        # Nothing active: every resumed stream got a slot, unless older plain arrivals hold them all.
        arrivals = [s.arrival for s in self.waiting if s.start is None]
        n, wait = admit_count(arrivals, 0, now, self.config, self._previous) if arrivals else (1, None)
        return 0.0 if n else wait

    def _resume_waiting(self) -> None:
        """Resumed streams (a start, no prefill) go in at once, nothing to wait for, while a slot is
        free for them: slots go in arrival order, so one is theirs only once every older plain arrival
        waiting has one. One at a time: a stream that ends on its first char frees its slot again."""
        while True:
            free = self.config.max_active_streams - len(self.active)
            older, chosen = 0, None
            for s in self.waiting:
                if s.start is None:
                    older += 1
                elif free - older > 0:
                    chosen = s
                    break
                else:
                    return
            if chosen is None:
                return
            with self._lock:
                self.waiting.remove(chosen)
                self._prefilling.add(chosen)
            self._resume(chosen)

    def fail_all(self, error: BaseException) -> None:
        """End every stream with `error` and refuse later submits (the batcher shuts down)."""
        with self._lock:
            self.closed = error
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            prefilling = list(self._prefilling)
            self._prefilling.clear()
        for s in self.waiting + prefilling + self.active:
            self._end(s, error)
        self.waiting, self.active = [], []

    def _left(self, s: _Stream) -> bool:
        if s.done:
            return True
        try:
            gone = s.cancelled is not None and s.cancelled()
        except Exception as e:  # a broken callback ends only its own stream
            self._end(s, e)
            return True
        if gone:
            s.decoder.finish(FinishReason.CANCELLED)
            self._end(s, s.decoder.finished_event())
        return gone

    def _step(self, streams: list[_Stream], tokens: np.ndarray, state: State,
              k: int) -> tuple[np.ndarray, State] | None:
        """One engine call: `tokens` stepped, then K chars sampled per row (uniforms by draw index).

        A prompt longer than PREFILL_CHUNK first goes through core.prefill up to its last chunk, so no
        call holds logits for more than PREFILL_CHUNK positions (memory follows the configuration)."""
        t0 = time.perf_counter()
        try:
            if tokens.shape[1] > PREFILL_CHUNK:
                cut = (tokens.shape[1] - 1) // PREFILL_CHUNK * PREFILL_CHUNK
                _, state = prefill(self.engine, tokens[:, :cut], state)
                tokens = tokens[:, cut:]
            u = philox_uniforms(np.array([s.decoder.seed for s in streams], np.uint64),
                                np.array([s.decoder.draws for s in streams], np.uint64), k)
            params = [s.decoder.request.sampling for s in streams]
            out = self.engine.generate(
                tokens, state, u, np.array([p.temperature for p in params], np.float64),
                np.array([p.top_k for p in params], np.int64), np.array([p.top_p for p in params]))
        except Exception as e:  # the engine failed this call: its streams fail, the others go on
            log.exception("engine call failed for %d stream(s)", len(streams))
            self.stats.failed_calls += 1
            for s in streams:
                self._end(s, e)
            return None
        finally:
            self.stats.engine_seconds += time.perf_counter() - t0
        return out

    def _prefill(self, group: list[_Stream]) -> None:
        # A tick may run several prefill calls back to back: a caller gone meanwhile costs no call.
        live = [s for s in group if not self._left(s)]
        if live:
            self.stats.prefill_calls += 1
            tokens = np.stack([s.decoder.prompt_tokens for s in live])
            out = self._step(live, tokens, self.engine.initial_state(len(live)), 1)
            if out is not None:
                self._scatter(live, out)
        with self._lock:
            self.active.extend(s for s in live if not s.done)
            self._prefilling.difference_update(group)

    def _resume(self, s: _Stream) -> None:
        """A stream with a start: its first char from the given logits (no engine call), then it
        decodes from the given state with the others."""
        assert s.start is not None
        state, logits = s.start
        s.start = None
        try:
            text = s.decoder.feed(logits)
        except Exception as e:  # e.g. logits holding NaN: only this stream fails
            self._end(s, e)
        else:
            s.state = (state, 0)
            if text:
                self._call(s, s.on_text, text)
            if s.decoder.finished:
                self._end(s, s.decoder.finished_event())
        with self._lock:
            if not s.done:
                self.active.append(s)
            self._prefilling.discard(s)

    def _decode(self, chunk: list[_Stream], now: float) -> None:
        # A burst being held is not admitted next tick: the call may run until its hold ends.
        until = [s.deadline - now for s in chunk if s.deadline is not None]
        if self._held is not None:
            until.append(self._held)
        # Arrivals waiting shrink K so their prefill comes soon; not while no slot is free for them.
        admissible = len(self.active) < self.config.max_active_streams and self._held is None
        k = chars_per_call(
            self.k, arrivals_waiting=(bool(self.waiting) or self.has_arrivals) and admissible,
            remaining=max(s.remaining for s in chunk), seconds_per_char=self.seconds_per_char,
            until_deadline_s=min(until) if until else None, config=self.config)
        self.k = k
        self.stats.decode_calls += 1
        self.stats.decode_rows += len(chunk)
        self.stats.decode_chars += k
        self.stats.batch_sizes[len(chunk)] = self.stats.batch_sizes.get(len(chunk), 0) + 1
        tokens = np.array([[s.decoder.next_token] for s in chunk], dtype=np.int64)
        t0 = time.perf_counter()
        out = self._step(chunk, tokens, self._gather(chunk), k)
        took = (time.perf_counter() - t0) / k
        smoothed = 0.7 * self.seconds_per_char + 0.3 * took
        self.seconds_per_char = smoothed if self.seconds_per_char else took
        if out is not None:
            self._scatter(chunk, out)

    @staticmethod
    def _gather(chunk: list[_Stream]) -> State:
        """The chunk's state rows as one batch. In the steady state the chunk is exactly the rows of
        its previous engine call, in order, and that call's output state is passed on as is; else
        one `take` per source batch (streams joined or left), concatenated."""
        pieces: list[tuple[State, list[int]]] = []
        for s in chunk:
            assert s.state is not None
            source, row = s.state
            if pieces and pieces[-1][0] is source:
                pieces[-1][1].append(row)
            else:
                pieces.append((source, [row]))
        parts = [source if rows == list(range(source[0].shape[1])) else take(source, rows)
                 for source, rows in pieces]
        return parts[0] if len(parts) == 1 else concat_states(parts)

    def _scatter(self, streams: list[_Stream], out: tuple[np.ndarray, State]) -> None:
        """Feed each row's K chars to its Decoder until it finishes (a stop inside the chunk
        truncates it there); one on_text per stream per call."""
        tokens, state = out
        for i, s in enumerate(streams):
            parts: list[str] = []
            try:
                for token in tokens[i].tolist():
                    if token < 0:  # only this stream fails
                        raise ValueError("logits contain NaN")
                    parts.append(s.decoder.feed_token(token))
                    if s.decoder.finished:
                        break
            except Exception as e:
                self._end(s, e)
                continue
            s.state = (state, i)
            text = "".join(parts)
            if text:
                self._call(s, s.on_text, text)
            if s.decoder.finished:
                self._end(s, s.decoder.finished_event())

    def _end(self, s: _Stream, end: Finished | BaseException) -> None:
        if not s.done:
            s.done = True
            s.state = None
            self._call(s, s.on_end, end)

    def _call(self, s: _Stream, fn: Callable, arg: object) -> None:
        try:
            fn(arg)
        except Exception as e:  # a consumer's callback must not stop the other streams
            log.exception("stream callback failed; dropping the stream")
            if fn is s.on_end:
                s.done = True
            else:  # its on_end still comes, once, with the error
                self._end(s, e)
