"""A typing session's text and model state: appends step only new characters, deletes restore saved states."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from nextchar.server.core.generation import GenerationRequest
from nextchar.server.core.prefill import PREFILL_CHUNK
from nextchar.server.core.sampling import InvalidParameterError, SamplingParams
from nextchar.server.core.vocab import OovPolicy, decode, encode

State = tuple[np.ndarray, ...]  # (h,) or (h, c), each float32[num_layers, 1, hidden_size]


class SessionTextLimitError(RuntimeError):
    """An edit would grow the session past its character bound (the per-session memory bound)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SessionLimits:
    """Per-session bounds (from ServerConfig): the text it may hold and the states it keeps for deletes."""

    max_chars: int = 10_000
    saved_states: int = 16


@dataclass(frozen=True)
class SessionOptions:
    """How a session answers edits: `n` predictions after each (0: none) at `temperature`; OOV handling."""

    n: int = 0
    temperature: float = 1.0
    oov_policy: OovPolicy = OovPolicy.ERROR
    oov_replacement: str | None = None


@dataclass(frozen=True)
class Step:
    """What one edit needs from the engine: run `tokens: int64[T]` from `state` (None: the zero state).

    T == 0 means nothing to run: `state` and `logits` (float32[V], None while the text is empty) are
    the result already (a delete that landed on a saved state). `length` is the text length once
    the result is committed; the text keeps its first `length - T` tokens and then `tokens`.
    `keep` > 0: run `tokens[:keep]` first and commit the result after them too (a checkpoint).
    """

    tokens: np.ndarray
    state: State | None
    length: int
    logits: np.ndarray | None = None
    keep: int = 0


class TypingSession:
    """The text a client is typing, as token ids, with the model state after it and the last logits row.

    Edits are prepared (`append`, `delete`, `reset` -> Step), stepped by the caller however it batches,
    then `commit`ted; so nothing here calls the engine and a failed step leaves the session as it was.
    The states after the most recent `saved_states` lengths are kept (a state read from again counts
    as recent), so deleting back to one of them costs no engine call; a delete beyond them re-reads the
    text from the nearest saved state below. A step over more than PREFILL_CHUNK characters also keeps
    the state at the last multiple of PREFILL_CHUNK it passes: a delete a little way into a long paste
    or re-read re-reads at most about that many characters, not the whole text again each time.
    """

    def __init__(self, vocab: tuple[str, ...], vocab_index: dict[str, int], limits: SessionLimits) -> None:
        self.vocab, self._index, self.limits = vocab, vocab_index, limits
        self.tokens: list[int] = []
        self.state: State | None = None
        self.logits: np.ndarray | None = None  # float32[V] after the last token; None while empty
        self.last_completion = ""
        self._saved: OrderedDict[int, tuple[State, np.ndarray]] = OrderedDict()

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return decode(np.asarray(self.tokens, dtype=np.int64), self.vocab)

    def encode(self, text: str, field: str, oov_policy: OovPolicy = OovPolicy.ERROR,
               oov_replacement: str | None = None) -> np.ndarray:
        """`text` as token ids: int64[T] (OutOfVocabularyError per the policy). The length bound is
        checked first, so a huge message is refused before any work (or error detail) grows with it."""
        self._check_room(len(text), field)
        return encode(text, self._index, oov_policy, oov_replacement, field=field)

    def _check_room(self, added: int, field: str) -> None:
        if self.length + added > self.limits.max_chars:
            raise SessionTextLimitError(
                field, f"the session would hold {self.length + added} characters; at most "
                       f"{self.limits.max_chars} (delete or reset first)")

    def append(self, tokens: np.ndarray, field: str = "append") -> Step:
        """Step the new tokens only: int64[T] from the current state."""
        self._check_room(int(tokens.size), field)
        return self._step(tokens.astype(np.int64), self.state, self.length + int(tokens.size), self.logits)

    def delete(self, n: int) -> Step:
        """Drop the last `n` characters: the saved state at the new end, or a re-read from the one below."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.length:
            raise InvalidParameterError("delete", f"must be in [1, {self.length}] (the session's length), "
                                                  f"got {n}")
        end = self.length - n
        base = max((k for k in self._saved if k <= end), default=0)
        state, logits = self._saved[base] if base else (None, None)
        return self._step(np.asarray(self.tokens[base:end], dtype=np.int64), state, end, logits)

    def _step(self, tokens: np.ndarray, state: State | None, end: int, logits: np.ndarray | None) -> Step:
        """The step to `end`, with a checkpoint at the last multiple of PREFILL_CHUNK when a whole chunk
        or more lies before it (so it costs at most one engine call more; keystrokes never split)."""
        start = end - int(tokens.size)
        mark = end - end % PREFILL_CHUNK
        keep = mark - start if mark - start >= PREFILL_CHUNK and mark < end else 0
        # One saved state or none: the checkpoint would not outlive the commit.
        return Step(tokens, state, end, logits, keep if self.limits.saved_states > 1 else 0)

    def reset(self) -> Step:
        return Step(np.zeros(0, np.int64), None, 0)

    def commit(self, step: Step, logits: np.ndarray | None, state: State | None,
               kept: tuple[np.ndarray, State] | None = None) -> None:
        """Apply a prepared step with its engine result (`logits: float32[V]`, the state after it);
        `kept`: the (logits, state) after `step.tokens[:step.keep]`, when the step has a checkpoint."""
        start = step.length - step.tokens.size
        self.tokens[start:] = step.tokens.tolist()
        length = len(self.tokens)
        self.state, self.logits = (state, logits) if length else (None, None)
        for k in [k for k in self._saved if k > length]:
            del self._saved[k]
        if length and self.limits.saved_states:
            assert self.state is not None and self.logits is not None  # set above: tokens exist
            if start in self._saved:  # read from again (a checkpoint under repeated deletes): keep it longer
                self._saved.move_to_end(start)
            if kept is not None:
                self._saved[start + step.keep] = (kept[1], kept[0])
            self._saved[length] = (self.state, self.logits)
            self._saved.move_to_end(length)
            while len(self._saved) > self.limits.saved_states:
                self._saved.popitem(last=False)

    def completion(self, max_new_chars: int, sampling: SamplingParams, seed: int,
                   stop: tuple[str, ...]) -> GenerationRequest:
        """The request for a continuation of the text, to run from `state` and `logits` (the batcher's
        `start`, whose Decoder checks it against the vocabulary).

        The session itself is untouched (states are never changed in place), so an unaccepted
        completion costs the session nothing.
        """
        if not self.tokens:
            raise InvalidParameterError("complete", "the session's text is empty; append something first")
        return GenerationRequest(prompt=self.text, max_new_chars=max_new_chars, sampling=sampling,
                                 seed=seed, stop=stop)

    def free(self) -> None:
        """Drop the text and every state now (the session ended), whoever still holds the object."""
        self.tokens, self.state, self.logits, self.last_completion = [], None, None, ""
        self._saved.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of numbers this session holds: its tokens (8 each), its current and saved states and rows."""
        arrays = [*(self.state or ()), *([] if self.logits is None else [self.logits])]
        for state, logits in tuple(self._saved.values()):  # a metrics scrape reads it from its thread
            arrays += [*state, logits]
        unique = {id(a): a.nbytes for a in arrays}  # the current state is also the newest saved one
        return 8 * len(self.tokens) + sum(unique.values())


def session_bound_bytes(limits: SessionLimits, num_layers: int, hidden_size: int, cell_states: int,
                        vocab_size: int) -> int:
    """The most `TypingSession.nbytes` can reach for a model of these sizes: the per-session bound."""
    per_state = 4 * (cell_states * num_layers * hidden_size + vocab_size)
    return 8 * limits.max_chars + (limits.saved_states + 1) * per_state
