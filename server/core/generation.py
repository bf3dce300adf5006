"""One request's generation: prefill once, then sample char by char; stop rules, finish reasons, usage."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from nextchar.server.core.limits import MAX_NEW_CHARS, MAX_SEED, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, shown
from nextchar.server.core.prefill import prefill
from nextchar.server.core.sampling import InvalidParameterError, SamplingParams, philox_uniform, sample
from nextchar.server.core.vocab import OovPolicy, build_index, decode, encode

Clock = Callable[[], float]


class FinishReason(enum.Enum):
    LENGTH = "length"                # max_new_chars generated
    STOP_SEQUENCE = "stop_sequence"  # a stop sequence was generated; it is not part of the output
    CANCELLED = "cancelled"          # the caller went away
    DEADLINE = "deadline"            # the caller's deadline passed (set by whoever watches it)


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Validated on construction (InvalidParameterError naming the field).

    Generated char i samples with the uniform `philox_uniform(seed, i)` (docs/sampling.md), so the same
    request with the same seed yields the same text, batched or not, in every runtime. `echo`
    prepends the prompt as the model saw it (after the out-of-vocabulary policy). Stop sequences
    match generated text only.
    """

    prompt: str
    max_new_chars: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: tuple[str, ...] = ()
    echo: bool = False
    oov_policy: OovPolicy = OovPolicy.ERROR
    oov_replacement: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InvalidParameterError("prompt", "must be at least one character (the model has no "
                                                  "start-of-text token to condition on)")
        n = self.max_new_chars
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_NEW_CHARS:
            raise InvalidParameterError("max_new_chars", f"must be in [1, {MAX_NEW_CHARS}], got {shown(n)}")
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidParameterError("sampling", f"must be SamplingParams, got {type(self.sampling)}")
        self.sampling.validate()
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
            raise InvalidParameterError("seed", f"must be an integer in [0, 2^64-1], got {shown(s)}")
        if not isinstance(self.stop, tuple):
            raise InvalidParameterError("stop", f"must be a tuple of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidParameterError(
                "stop", f"must have at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        for i, seq in enumerate(self.stop):
            if not isinstance(seq, str) or not 1 <= len(seq) <= MAX_STOP_CHARS:
                raise InvalidParameterError(
                    f"stop[{i}]", f"must be a string of 1 to {MAX_STOP_CHARS} characters, got {shown(seq)}")
        if not isinstance(self.oov_policy, OovPolicy):
            raise InvalidParameterError("oov_policy", f"must be one of {[p.value for p in OovPolicy]}")
        if self.oov_policy is not OovPolicy.REPLACE and self.oov_replacement is not None:
            raise InvalidParameterError("oov_replacement", "is only allowed with the replace policy")


@dataclass(frozen=True)
class Usage:
    prompt_chars: int     # tokens the model read (after the out-of-vocabulary policy)
    generated_chars: int  # characters sampled, including a matched stop sequence


@dataclass(frozen=True)
class Timings:
    time_to_first_char_s: float | None  # from Decoder creation to the first sampled char
    total_s: float


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    seed: int
    timings: Timings
    stop_sequence: str | None = None  # the stop sequence that ended generation, if any


GenerationEvent = TextChunk | Finished


class Decoder:
    """One request's state machine, independent of how its engine steps are computed.

    Construct it (encodes the prompt: `prompt_tokens: int64[T]`), run ONE engine call on the whole
    prompt, then `feed` the last logits row; while not `finished`, feed the engine `next_token` and
    `feed` the resulting row. The batcher drives many Decoders this way; `generate` drives one.

    Hold-back: text that could be the start of a stop sequence is withheld until resolved, so a stop
    sequence is never partly emitted; when generation ends for LENGTH the withheld text is released.
    """

    def __init__(self, request: GenerationRequest, vocab: tuple[str, ...],
                 vocab_index: dict[str, int] | None = None, *, clock: Clock = time.perf_counter) -> None:
        self.request = request
        self.vocab = vocab
        index = vocab_index if vocab_index is not None else build_index(vocab)
        self.prompt_tokens: np.ndarray = encode(
            request.prompt, index, request.oov_policy, request.oov_replacement, field="prompt")
        if self.prompt_tokens.size == 0:
            raise InvalidParameterError("prompt", "no character of it is in the model's vocabulary")
        if request.sampling.top_k > len(vocab):
            raise InvalidParameterError("top_k", f"must be in [0, {len(vocab)}] (0 = off; the vocabulary "
                                                 f"size), got {request.sampling.top_k}")
        self._clock = clock
        self._started = clock()
        self._first_char_at: float | None = None
        self._pending = ""  # generated, not yet released: a possible start of a stop sequence
        self.generated_chars = 0
        self.finished = False
        self.finish_reason: FinishReason | None = None
        self.stop_sequence: str | None = None
        self.next_token: int | None = None
        self._finished_at: float | None = None

    @property
    def echo_text(self) -> str:
        """The prompt as the model read it; emit it first when `request.echo` is set."""
        return decode(self.prompt_tokens, self.vocab)

    @property
    def seed(self) -> int:
        """The key of this request's draws (request.seed)."""
        return self.request.seed

    @property
    def draws(self) -> int:
        """Chars sampled so far: the counter of the next draw, used whether or not the request is greedy."""
        return self.generated_chars

    def feed(self, logits_row: np.ndarray) -> str:
        """Sample the next char from `logits_row: float32[V]`; return newly releasable text (maybe "")."""
        if self.finished:
            raise RuntimeError("feed() on a finished Decoder")
        sampling = self.request.sampling
        u = 0.0 if sampling.greedy else philox_uniform(self.seed, self.draws)  # greedy ignores its draw
        return self.feed_token(sample(logits_row, sampling, u))

    def feed_token(self, token: int) -> str:
        """`feed` for a token the caller sampled with request.sampling and the uniform of draw `draws`
        of `seed` (the batcher samples all its rows in one `sample_rows` call); returns newly
        releasable text (maybe "")."""
        if self.finished:
            raise RuntimeError("feed_token() on a finished Decoder")
        self.generated_chars += 1
        if self._first_char_at is None:
            self._first_char_at = self._clock()
        self._pending += self.vocab[token]
        match = self._completed_stop()
        if match is not None:
            start, seq = match
            out, self._pending = self._pending[:start], ""
            self.stop_sequence = seq
            self._finish(FinishReason.STOP_SEQUENCE)
            return out
        if self.generated_chars >= self.request.max_new_chars:
            out, self._pending = self._pending, ""
            self._finish(FinishReason.LENGTH)
            return out
        self.next_token = token
        held = self._held_suffix_len()
        out = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(self._pending) - held:]
        return out

    def finish(self, reason: FinishReason) -> None:
        """End early (cancelled, deadline). Withheld text is dropped: it may be part of a stop sequence."""
        if not self.finished:
            self._pending = ""
            self._finish(reason)

    def finished_event(self) -> Finished:
        if not self.finished or self.finish_reason is None or self._finished_at is None:
            raise RuntimeError("finished_event() before the Decoder finished")
        ttfc = None if self._first_char_at is None else self._first_char_at - self._started
        return Finished(
            reason=self.finish_reason,
            usage=Usage(prompt_chars=int(self.prompt_tokens.size), generated_chars=self.generated_chars),
            seed=self.request.seed,
            timings=Timings(time_to_first_char_s=ttfc, total_s=self._finished_at - self._started),
            stop_sequence=self.stop_sequence,
        )

    def _finish(self, reason: FinishReason) -> None:
        self.finished = True
        self.finish_reason = reason
        self.next_token = None
        self._finished_at = self._clock()

    def _completed_stop(self) -> tuple[int, str] | None:
        # Checked after every char, so a new match can only end at the last char. Among stops that
        # complete together, the earliest start wins (it occurred first in the text).
        best: tuple[int, str] | None = None
        for seq in self.request.stop:
            if self._pending.endswith(seq):
                start = len(self._pending) - len(seq)
                if best is None or start < best[0]:
                    best = (start, seq)
        return best

    def _held_suffix_len(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        held = 0
        for seq in self.request.stop:
            for k in range(min(len(seq) - 1, len(self._pending)), held, -1):
                if self._pending.endswith(seq[:k]):
                    held = k
                    break
        return held


def generate(engine, request: GenerationRequest, *, clock: Clock = time.perf_counter,
             cancelled: Callable[[], bool] | None = None) -> Iterator[GenerationEvent]:
    """The unbatched loop: the prompt in engine calls of PREFILL_CHUNK positions, then one call per
    generated char.

    `engine` is anything with `vocab`, `initial_state(batch)` and `step(tokens int64[B, T], state)`.
    Yields TextChunk events (never empty) then exactly one Finished. `cancelled()` is polled before
    every engine call; when it returns True the loop ends with FinishReason.CANCELLED.
    """
    dec = Decoder(request, engine.vocab, getattr(engine, "vocab_index", None), clock=clock)
    if request.echo:
        yield TextChunk(dec.echo_text)
    tokens = dec.prompt_tokens[None, :]
    state = engine.initial_state(1)
    while True:
        if cancelled is not None and cancelled():
            dec.finish(FinishReason.CANCELLED)
            break
        # The prompt in chunks, keeping the last position's logits only; then one char per call.
        last, state = prefill(engine, tokens, state)
        text = dec.feed(last[0])
        if text:
            yield TextChunk(text)
        if dec.finished:
            break
        tokens = np.array([[dec.next_token]], dtype=np.int64)
    yield dec.finished_event()
