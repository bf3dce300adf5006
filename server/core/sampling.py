"""Pure-numpy next-character sampling: greedy, temperature, top-k, top-p, with an explicit generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# An upper bound that still means something: at T=100 every logit gap shrinks 100-fold, which is
# already indistinguishable from uniform for any trained model; larger values are almost surely typos.
MAX_TEMPERATURE = 100.0


class InvalidParameterError(ValueError):
    """A request parameter out of its allowed range; `field` names it, the message says the range.

    Shared by every request-level check in the inference core (sampling, generation, vocab), so the
    gRPC edge maps one class to INVALID_ARGUMENT and can point at the field.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next character from the logits.

    temperature 0 = greedy (argmax, ties to the lowest id; the generator is not consumed);
    top_k 0 = off; top_p 1.0 = off. Filters apply in the order temperature, top-k, top-p.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidParameterError naming the first field that is out of range."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not (
            0.0 <= t <= MAX_TEMPERATURE
        ):
            raise InvalidParameterError(
                "temperature", f"must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise InvalidParameterError("top_k", f"must be an integer >= 0 (0 = off), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not (
            0.0 < p <= 1.0
        ):
            raise InvalidParameterError("top_p", f"must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Do top-k or top-p narrow the candidates (sampled in descending logit order)?"""
        return bool(self.top_k) or self.top_p < 1.0


def _as_row(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty vector float[V], got shape {x.shape}")
    return x


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from `logits: float[V]` (float64 arithmetic): the one-row definition.

    Greedy: argmax, ties to the lowest id, no draw. Otherwise exactly one `rng.random()` draw per
    call whatever the filters, so a request's draws depend only on its seed and step count; the draw
    is mapped through the cumulative distribution over candidates in id order, or, when top-k or
    top-p filter them, in descending logit order (ties by id). Either order is fixed by the logits
    alone, so equal logits give equal tokens. `sample_rows` computes the same for a batch of rows;
    this one-row form stays for the unbatched loop, which calls it per char: 13-20 us here against
    ~50 us for `sample_rows` on one row (its fixed numpy overhead).
    """
    x = _as_row(logits)
    top = x.max()
    if top != top:  # max propagates NaN
        raise ValueError("logits contain NaN")
    if params.greedy:
        return int(np.argmax(x))
    if not params.filtered:
        cum = np.exp((x - top) / params.temperature).cumsum()
        return min(int(cum.searchsorted(rng.random() * cum[-1], side="right")), x.size - 1)
    return _sample_filtered(x, top, params, rng)


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams],
                rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """`sample` for every row of `logits: float[B, V]`, row i with params[i] and rngs[i]: int64[B],
    -1 for a row whose logits contain NaN (its caller fails that row alone).

    Row by row the same tokens and draws as `sample` whatever the other rows are (a test holds it
    to that), so a stream's text does not depend on its batch mates. The batcher calls this for every
    engine call: the plain-temperature rows (the common case) go together in a few numpy calls over
    [B, V] (one exp, one cumsum, and a count of `cum <= u * total`, which is
    `searchsorted(side="right")` on a non-decreasing row); rows with top-k or top-p go one by one.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0 or x.shape[0] != len(params) or len(params) != len(rngs):
        raise ValueError(f"logits must be float[B, V] with B = len(params) = len(rngs), got shape "
                         f"{x.shape}, {len(params)} params, {len(rngs)} generators")
    top = x.max(axis=1)  # max propagates NaN
    tokens = x.argmax(axis=1)
    plain = [i for i, p in enumerate(params) if not p.greedy and not p.filtered]
    if plain:
        rows = np.asarray(plain)
        temperature = np.array([params[i].temperature for i in plain])
        cum = np.exp((x[rows] - top[rows, None]) / temperature[:, None]).cumsum(axis=1)
        u = np.array([rngs[i].random() for i in plain])
        picked = (cum <= (u * cum[:, -1])[:, None]).sum(axis=1)
        tokens[rows] = np.minimum(picked, x.shape[1] - 1)
    for i, p in enumerate(params):
        if not p.greedy and p.filtered:
            tokens[i] = _sample_filtered(x[i], top[i], p, rngs[i])
    tokens[top != top] = -1
    return tokens


def _sample_filtered(x: np.ndarray, top: float, params: SamplingParams, rng: np.random.Generator) -> int:
    order = np.argsort(-x, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    cum = np.exp((x[order] - top) / params.temperature).cumsum()  # unnormalised, most likely first
    last = cum.size - 1
    if params.top_p < 1.0:
        # The smallest prefix whose mass reaches top_p (always at least the most likely token).
        last = min(int(cum.searchsorted(params.top_p * cum[-1], side="left")), last)
    i = int(cum.searchsorted(rng.random() * cum[last], side="right"))
    return int(order[min(i, last)])


_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_LO = np.uint64(0xFFFFFFFF)


def philox_uniforms(seeds: np.ndarray, counters: np.ndarray, k: int = 1) -> np.ndarray:
    """float64[B, k]: row b, column j = the SAMPLER_SPEC uniform of (seeds[b], counters[b] + j).

    Philox4x32-10 keyed by the seed, counter = the draw index; u = (x1:x0 >> 11) * 2^-53 in [0, 1).
    (Provisional copy for the K-step engine; the sampler branch owns the definitive one.)
    """
    seeds = np.asarray(seeds, np.uint64).reshape(-1, 1)
    i = np.asarray(counters, np.uint64).reshape(-1, 1) + np.arange(k, dtype=np.uint64)
    s32 = np.uint64(32)
    c0, c1 = i & _LO, i >> s32
    c2 = c3 = np.zeros_like(i)
    k0, k1 = seeds & _LO, seeds >> s32
    with np.errstate(over="ignore"):
        for r in range(10):
            p0, p1 = _PHILOX_M[0] * c0, _PHILOX_M[1] * c2
            c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & _LO, (p0 >> s32) ^ c3 ^ k1, p0 & _LO
            if r < 9:
                k0, k1 = (k0 + _PHILOX_W[0]) & _LO, (k1 + _PHILOX_W[1]) & _LO
    return (((c1 << s32) | c0) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64: float[..., V] -> float64[..., V]."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float[V] -> float64[V] probabilities at `temperature` (> 0)."""
    if not temperature > 0.0:
        raise InvalidParameterError("temperature", f"must be > 0 for probabilities, got {temperature!r}")
    return np.exp(log_softmax(_as_row(logits) / temperature))


def top_n(logits: np.ndarray, n: int, temperature: float = 1.0) -> list[tuple[int, float]]:
    """The `n` most probable ids of `logits: float[V]` as (id, probability), most probable first.

    Probabilities are over the whole vocabulary (not renormalised over the n). Ties go to the lower id.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidParameterError("n", f"must be an integer >= 1, got {n!r}")
    probs = softmax(logits, temperature)
    order = np.argsort(-probs, kind="stable")[:n]
    return [(int(i), float(probs[i])) for i in order]
