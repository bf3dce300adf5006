"""Next-character prediction and text log-likelihood, the text through the engine in bounded chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nextchar.server.core.limits import DEFAULT_TEMPERATURE, MAX_TEMPERATURE, shown
from nextchar.server.core.prefill import PREFILL_CHUNK, prefill
from nextchar.server.core.sampling import InvalidParameterError, log_softmax
from nextchar.server.core.vocab import OovPolicy, build_index, encode


def _index(engine) -> dict[str, int]:
    index = getattr(engine, "vocab_index", None)
    return index if index is not None else build_index(engine.vocab)


@dataclass(frozen=True)
class Prediction:
    char: str
    token_id: int
    probability: float  # softmax(logits / temperature) over the whole vocabulary
    logprob: float      # its natural log, computed stably (finite even where probability underflows)


def predict(engine, context: str, n: int, *, temperature: float = DEFAULT_TEMPERATURE,
            oov_policy: OovPolicy = OovPolicy.ERROR, oov_replacement: str | None = None) -> list[Prediction]:
    """The `n` most probable next characters after `context`, most likely first (ties: lower id).

    n is at most the vocabulary size.
    """
    if not isinstance(context, str) or not context:
        raise InvalidParameterError("context", "must be at least one character")
    vocab_size = len(engine.vocab)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= vocab_size:
        raise InvalidParameterError(
            "n", f"must be in [1, {vocab_size}] (the vocabulary size), got {shown(n)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        0.0 < temperature <= MAX_TEMPERATURE
    ):
        raise InvalidParameterError(
            "temperature", f"must be in (0, {MAX_TEMPERATURE:g}] (absent = {DEFAULT_TEMPERATURE:g}), "
                           f"got {shown(temperature)}")
    tokens = encode(context, _index(engine), oov_policy, oov_replacement, field="context")
    if tokens.size == 0:
        raise InvalidParameterError("context", "no character of it is in the model's vocabulary")
    last, _ = prefill(engine, tokens[None, :], engine.initial_state(1))
    return top_predictions(last[0], engine.vocab, n, temperature)


def top_predictions(logits_row: np.ndarray, vocab: tuple[str, ...], n: int,
                    temperature: float = 1.0) -> list[Prediction]:
    """The `n` most probable entries of `logits_row: float32[V]` at `temperature`, most likely first."""
    ids, probs, logprobs = top_entries(logits_row, min(n, len(vocab)), temperature)
    return [Prediction(vocab[i], i, p, lp) for i, p, lp in zip(ids, probs, logprobs, strict=True)]


def top_entries(logits_row: np.ndarray, n: int,
                temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    """top_predictions as plain lists (token ids, probabilities, logprobs), for a caller that builds
    its own messages from them: a typing session's answer to every keystroke."""
    # log_softmax of one row in ndarray methods (no numpy dispatch wrappers), then one array op per
    # list rather than n scalar ones: this runs on every keystroke
    z = np.array(logits_row, dtype=np.float64)
    if temperature != 1.0:
        z /= temperature
    z -= z.max()
    z -= math.log(np.exp(z).sum())
    order = np.argsort(-z, kind="stable")[:n]
    top = z[order]
    return order.tolist(), np.exp(top).tolist(), top.tolist()


@dataclass(frozen=True)
class ScoreResult:
    """How likely the model finds a text.

    scored_chars: how many characters were scored; log_likelihood_nats: sum of their natural-log
    probabilities (<= 0); nats_per_char / bits_per_char: the mean negative log-likelihood;
    perplexity = exp(nats_per_char); per_char: (char, logprob in nats) per scored char, when asked.
    """

    scored_chars: int
    log_likelihood_nats: float
    nats_per_char: float
    bits_per_char: float
    perplexity: float
    per_char: tuple[tuple[str, float], ...] | None = None


def score(engine, text: str, *, context: str = "", per_char: bool = False,
          oov_policy: OovPolicy = OovPolicy.ERROR, oov_replacement: str | None = None) -> ScoreResult:
    """Log-likelihood of `text` under the model.

    Convention: the model has no start-of-text token, so something must be given before the first
    scored character. With a `context`, every character of `text` is scored given the context and
    the text before it. Without one, the first character of `text` is the condition and
    text[1:] is scored (so `text` needs at least two characters). context + text[:-1] goes through
    the engine in chunks of PREFILL_CHUNK positions; each chunk's scored log-probabilities are
    gathered before the next, so memory follows the chunk, not the text.
    """
    if not isinstance(text, str):
        raise InvalidParameterError("text", "must be a string")
    index = _index(engine)
    ctx = encode(context, index, oov_policy, oov_replacement, field="context")
    ids = encode(text, index, oov_policy, oov_replacement, field="text")
    if ctx.size == 0:
        if ids.size < 2:
            raise InvalidParameterError(
                "text", "must have at least two characters when no context is given (the first one is "
                        "the condition, the rest are scored)")
        ctx, ids = ids[:1], ids[1:]
    elif ids.size == 0:
        raise InvalidParameterError("text", "must have at least one character")
    inputs = np.concatenate([ctx, ids[:-1]])[None, :]
    # The logits at input position t predict input t+1, so the scored chars' rows start at the
    # context's last position: scored char j is predicted at input position ctx.size - 1 + j.
    logprobs = np.empty(ids.size, np.float64)
    state, first = engine.initial_state(1), ctx.size - 1
    for start in range(0, inputs.shape[1], PREFILL_CHUNK):
        logits, state = engine.step(np.ascontiguousarray(inputs[:, start:start + PREFILL_CHUNK]), state)
        lo = max(start, first)
        hi = start + logits.shape[1]
        if lo < hi:
            rows = log_softmax(logits[0, lo - start:hi - start])
            logprobs[lo - first:hi - first] = rows[np.arange(hi - lo), ids[lo - first:hi - first]]
        del logits
    total = float(logprobs.sum())
    nats = -total / ids.size
    return ScoreResult(
        scored_chars=int(ids.size),
        log_likelihood_nats=total,
        nats_per_char=nats,
        bits_per_char=nats / math.log(2.0),
        perplexity=math.exp(nats),
        per_char=tuple((engine.vocab[t], float(lp)) for t, lp in zip(ids, logprobs, strict=True))
        if per_char else None,
    )
