"""The one portable seeded sampler: Philox4x32-10 uniforms and a float64 rule (docs/sampling.md)."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nextchar.server.core.limits import DEFAULT_TEMPERATURE, MAX_TEMPERATURE


class InvalidParameterError(ValueError):
    """A request parameter out of its allowed range; `field` names it, the message says the range.

    Shared by every request-level check in the inference core (sampling, generation, vocab), so the
    gRPC edge maps one class to INVALID_ARGUMENT and can point at the field.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_F32 = struct.Struct("<f")


def _float32(value: object) -> object:
    """A number as the float32 the wire carries (widened back to a Python float); others unchanged.
    struct's C cast rounds as numpy's does (to nearest, ties to even); ~13x cheaper than np.float32
    under np.errstate, which was a few percent of the event loop's time per request (py-spy)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.float64):
        with np.errstate(over="ignore"):  # wider than a double (int64 past 2^53, longdouble): one rounding
            return float(np.float32(value))
    try:
        return float(_F32.unpack(_F32.pack(float(value)))[0])
    except OverflowError:  # too large for a float32 (or a double): inf, which validation then refuses
        return math.inf if value > 0 else -math.inf


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next character from the logits (the rule: docs/sampling.md).

    temperature 0 = greedy (argmax, ties to the lowest id); top_k 0 = off; top_p 1.0 = off. temperature
    and top_p are rounded to float32 first, as the gRPC API carries them, so the offline runner, the
    server and the JavaScript runtimes sample with the very same numbers (and refuse the same ones).
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", _float32(self.temperature))
        object.__setattr__(self, "top_p", _float32(self.top_p))
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


# ------------------------------------------------------------------------------------------------
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; Random123).
# Counter-based: draw i of a request is a pure function of (seed, i), so it needs no generator state
# and any number of draws can be made at once, in any order, for any set of requests.

_MASK32 = np.uint64(0xFFFFFFFF)
_MUL = np.array([[0xD2511F53], [0xCD9E8D57]], dtype=np.uint64)   # multipliers of (c0, c2)
_WEYL = np.array([[0x9E3779B9], [0xBB67AE85]], dtype=np.uint64)  # key bumps of (k0, k1)
_ROUNDS = 10
_TWO_M53 = 2.0 ** -53
_SCALAR_DRAWS = 12  # up to this many draws, philox_uniforms loops over philox_uniform


def philox4x32(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10 blocks: `counter: uint[4, N]`, `key: uint[2, N]` (32-bit words, word 0 lowest)
    -> `uint64[4, N]` (32-bit words). Products of two 32-bit words are exact in uint64."""
    even = np.asarray(counter, dtype=np.uint64)[0::2]  # (c0, c2): the words that are multiplied
    odd = np.asarray(counter, dtype=np.uint64)[1::2]   # (c1, c3)
    # Round r's key is the key bumped r times (mod 2^32): all ten at once, [rounds, 2, N].
    bumps = np.arange(_ROUNDS, dtype=np.uint64)[:, None, None] * _WEYL
    keys = (np.asarray(key, dtype=np.uint64)[None] + bumps) & _MASK32
    for r in range(_ROUNDS):
        p = (even * _MUL)[::-1]  # (M1*c2, M0*c0), exact in uint64
        even, odd = (p >> np.uint64(32)) ^ odd ^ keys[r], p & _MASK32
    return np.stack([even[0], odd[0], even[1], odd[1]])


def philox_uniforms(seeds: np.ndarray, counters: np.ndarray, k: int = 1) -> np.ndarray:
    """`seeds: uint64[B]`, `counters: uint64[B]` -> `float64[B, k]`: column j of row b is the uniform of
    draw `counters[b] + j` of seed `seeds[b]` (key = the seed's two 32-bit halves, counter = the draw
    index's two halves, then 0, 0)."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1)
    draws: np.ndarray = (np.asarray(counters, dtype=np.uint64).reshape(-1, 1)
                         + np.arange(k, dtype=np.uint64)).reshape(-1)  # wraps mod 2^64 like a uint64 counter
    if draws.size != seeds.size * k:
        raise ValueError(f"seeds and counters must both be uint64[B], got {seeds.size} and {draws.size // k}")
    if draws.size <= _SCALAR_DRAWS:  # numpy's ~50 calls cost ~100 us whatever the size; a draw ~7 us
        row_seeds = [int(s) for s in seeds for _ in range(k)]
        return np.array([philox_uniform(s, int(i)) for s, i in zip(row_seeds, draws, strict=True)],
                        dtype=np.float64).reshape(-1, k)
    keys: np.ndarray = np.repeat(seeds, k)
    zeros = np.zeros_like(draws)
    x = philox4x32(np.stack([draws & _MASK32, draws >> np.uint64(32), zeros, zeros]),
                   np.stack([keys & _MASK32, keys >> np.uint64(32)]))
    return (((x[1] << np.uint64(32)) | x[0]) >> np.uint64(11)).astype(np.float64).reshape(-1, k) * _TWO_M53


def philox_uniform(seed: int, counter: int) -> float:
    """`philox_uniforms` for one draw, in plain Python integers: ~7 us against ~100 us for numpy's fixed
    costs (the unbatched loop draws one per char). Tests hold the two equal."""
    m = 0xFFFFFFFF
    c0, c1, c2, c3 = counter & m, (counter >> 32) & m, 0, 0
    k0, k1 = seed & m, (seed >> 32) & m
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & m, (p0 >> 32) ^ c3 ^ k1, p0 & m
    return (((c1 << 32) | c0) >> 11) * _TWO_M53


# ------------------------------------------------------------------------------------------------
# exp, portably. Library exp differs between runtimes and machines (numpy's AVX-512 exp and V8's
# Math.exp disagree in the last bit on ~10% of inputs), which would change a sampled char now and
# then. This one uses only + - * / and exact scaling by 2^k, which IEEE 754 fixes bit for bit:
# fdlibm's e_exp.c algorithm for z <= 0, with results below 2^-1021 flushed to 0 (never subnormal).

# Public: any other implementation (e.g. an ONNX graph, docs/sampling.md) must use these very numbers.
EXP_MIN = -708.0
INVLN2 = 1.44269504088896338700e+00
LN2_HI = 6.93147180369123816490e-01  # low 32 bits zero: k * LN2_HI is exact for |k| < 2^20
LN2_LO = 1.90821492927058770002e-10
EXP_POLY = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05,
            -1.65339022054652515390e-06, 4.13813679705723846039e-08)  # P1..P5
_P1, _P2, _P3, _P4, _P5 = EXP_POLY


def portable_exp(z: np.ndarray) -> np.ndarray:
    """exp of `z: float64[...]`, every z <= 0 or -inf: float64[...], within 1 ulp of exp; 0 below EXP_MIN.

    In place on temporaries (the same operations in the same order): the unbatched loop calls this
    once per char on a few dozen values, where each numpy call's fixed cost is what counts.
    """
    z = np.asarray(z, dtype=np.float64)
    r = np.maximum(z, EXP_MIN)
    k = r * INVLN2
    k -= 0.5
    np.trunc(k, out=k)  # nearest integer to z / ln 2 (z <= 0), in [-1021, 0]
    lo = k * LN2_HI
    r -= lo  # hi = z - k * ln2_hi, exact
    hi = r.copy()
    np.multiply(k, LN2_LO, out=lo)
    r -= lo  # r = hi - lo
    t = r * r
    c = t * _P5
    c += _P4
    c *= t
    c += _P3
    c *= t
    c += _P2
    c *= t
    c += _P1
    c *= t
    np.subtract(r, c, out=c)  # c = r - t * (P1 + ...)
    r *= c  # r * c
    np.subtract(2.0, c, out=c)
    r /= c  # (r * c) / (2 - c)
    np.subtract(lo, r, out=r)
    r -= hi
    np.subtract(1.0, r, out=r)  # y
    w = np.ldexp(r, k.astype(np.int64))
    w[z < EXP_MIN] = 0.0
    return w


# ------------------------------------------------------------------------------------------------
# The rule. `sample` is the definition for one row; `sample_rows` computes the same for B rows at once.

def _as_row(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty vector float[V], got shape {x.shape}")
    return x


def filters(params: SamplingParams, vocab_size: int) -> bool:
    """Does the row drop candidates (top_k < V or top_p < 1)? Such a row samples in descending logit
    order; every other row in id order, which needs no sort (docs/sampling.md §4)."""
    return 0 < params.top_k < vocab_size or params.top_p < 1.0


def sample(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """Pick one token id from `logits: float[V]` with the uniform `u` in [0, 1) (float64 arithmetic).

    Greedy, or an infinite maximum (a +inf logit, or all -inf): the argmax, ties to the lowest id.
    Else weigh the candidates w = exp((x - max) / T) and let cum be their running sum: a row that
    filters (`filters`) takes them in descending logit order (ties: lower id first), keeps the first
    n = top_k (all when 0) and then the smallest prefix whose mass reaches top_p; any other row takes
    every id in id order. Pick the first candidate whose cum exceeds u * its mass. ValueError when the
    logits hold a NaN; a -inf logit weighs 0 and is never picked.
    """
    x = _as_row(logits)
    top = float(x.max())
    if top != top:  # max propagates NaN
        raise ValueError("logits contain NaN")
    if params.greedy or not math.isfinite(top):
        return int(x.argmax())
    if filters(params, x.size):
        order = np.argsort(-x, kind="stable")
        if params.top_k:
            order = order[: params.top_k]
        xs = x[order]
    else:
        order, xs = None, x.copy()
    xs -= top
    xs /= params.temperature
    cum = portable_exp(xs).cumsum()  # sequential, left to right
    # cum never decreases (it adds weights >= 0), so the counts of the rule are binary searches.
    last = cum.size - 1
    if params.top_p < 1.0:
        last = min(last, int(cum.searchsorted(params.top_p * cum[-1], side="left")))
    pick = min(last, int(cum[: last + 1].searchsorted(u * cum[last], side="right")))
    return pick if order is None else int(order[pick])


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams], u: np.ndarray) -> np.ndarray:
    """`sample` for every row of `logits: float[B, V]`, row b with params[b] and `u: float64[B]`:
    int64[B], -1 for a row whose logits hold a NaN (its caller fails that row alone).

    Row by row equal to `sample` whatever the other rows are (a test holds it to that): one stable
    argsort of the rows that filter (the others keep id order), one exp and one cumsum (numpy's is
    sequential along a row) over the sampled rows, and the two prefix counts as masked sums.
    """
    x = np.asarray(logits, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[1] == 0 or x.shape[0] != len(params) or len(params) != u.size:
        raise ValueError(f"logits must be float[B, V] with B = len(params) = len(u), got shape "
                         f"{x.shape}, {len(params)} params, {u.size} uniforms")
    top = x.max(axis=1)
    bad = np.isnan(top)  # max propagates NaN
    finite = np.isfinite(top)  # else the pick is the argmax (see `sample`)
    sampled = np.array([i for i, p in enumerate(params) if not p.greedy and finite[i]], dtype=np.int64)
    tokens = x.argmax(axis=1)
    if sampled.size:
        V, rows, col = x.shape[1], np.arange(sampled.size), np.arange(x.shape[1])
        xr = x[sampled]
        order = np.broadcast_to(col, xr.shape).copy()
        sort = np.array([filters(params[i], V) for i in sampled])
        if sort.any():
            order[sort] = np.argsort(-xr[sort], axis=1, kind="stable")
        xs = np.take_along_axis(xr, order, axis=1)
        temperature = np.array([params[i].temperature for i in sampled])
        cum = np.cumsum(portable_exp((xs - top[sampled, None]) / temperature[:, None]), axis=1)
        n = np.array([min(params[i].top_k, V) if params[i].top_k else V for i in sampled])
        top_p = np.array([params[i].top_p for i in sampled])
        reach = np.count_nonzero((cum < (top_p * cum[rows, n - 1])[:, None]) & (col < n[:, None]), axis=1)
        last = np.where(top_p < 1.0, np.minimum(n - 1, reach), n - 1)
        below = (cum <= (u[sampled] * cum[rows, last])[:, None]) & (col <= last[:, None])
        tokens[sampled] = order[rows, np.minimum(last, np.count_nonzero(below, axis=1))]
    tokens[bad] = -1
    return tokens


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax in float64: float[..., V] -> float64[..., V]."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))
