"""Sampling: Philox known answers, the portable exp, the rule's boundaries and distributions, batch = row."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nextchar.server.core.sampling import (
    EXP_MIN,
    InvalidParameterError,
    SamplingParams,
    log_softmax,
    philox4x32,
    philox_uniform,
    philox_uniforms,
    portable_exp,
    sample,
    sample_rows,
)

LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], dtype=np.float64)).astype(np.float32)
DRAWS = 32_000  # a frequency's standard error <= 0.003: the 0.02 tolerances are ~7 of them

# Random123's kat_vectors for philox4x32_10: (counter words, key words) -> output words, word 0 first.
# Checked independently against PyPI randomgen 2.5.1, Philox(number=4, width=32).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# (seed, draw index) -> uniform, computed with randomgen's Philox, not this code; also in docs/sampling.md.
UNIFORM_KAT = [
    (0x0, 0x0, 0.8805201978886142),
    (0x0, 0x1, 0.36209111566940344),
    (0x2A, 0x0, 0.4685865183391049),
    (0x2A, 0x1, 0.32706338120338474),
    (0x2A, 0x2, 0.6583155272123093),
    (0xFFFFFFFFFFFFFFFF, 0x100000000, 0.9410730820433714),
    (0x0123456789ABCDEF, 0xFFFFFFFFFFFFFFFF, 0.21352194515765777),
    (0x7, 0x3E8, 0.8029626021371045),
]


def uniforms(seed: int, n: int) -> np.ndarray:
    return philox_uniforms(np.array([seed], np.uint64), np.array([0], np.uint64), n)[0]


def frequencies(params: SamplingParams, logits=LOGITS, seed: int = 1234) -> np.ndarray:
    # sample_rows is held to `sample` row by row below; it makes 32,000 draws cheap.
    rows = np.broadcast_to(np.asarray(logits), (DRAWS, len(logits)))
    counts = np.bincount(sample_rows(rows, [params] * DRAWS, uniforms(seed, DRAWS)), minlength=len(logits))
    return counts / DRAWS


# ------------------------------------------------------------------------------------------------
# PRNG

@pytest.mark.parametrize(("counter", "key", "want"), PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    got = philox4x32(np.array(counter)[:, None], np.array(key)[:, None])[:, 0]
    assert [int(v) for v in got] == list(want)


@pytest.mark.parametrize(("seed", "draw", "want"), UNIFORM_KAT)
def test_uniform_known_answers(seed, draw, want):
    assert philox_uniform(seed, draw) == want
    assert philox_uniforms(np.array([seed], np.uint64), np.array([draw], np.uint64))[0, 0] == want


def test_vectorised_uniforms_equal_the_scalar_ones_and_lie_in_0_1():
    rng = np.random.default_rng(3)
    seeds = rng.integers(0, 2**64 - 1, 50, dtype=np.uint64, endpoint=True)
    edges = np.array([2**32 - 2, 2**32 - 1, 2**64 - 3, 2**64 - 2, 0], np.uint64)
    counters = np.concatenate([rng.integers(0, 1000, 45).astype(np.uint64), edges])
    got = philox_uniforms(seeds, counters, 4)
    assert got.shape == (50, 4) and got.dtype == np.float64
    for b in range(50):
        for j in range(4):  # counter + j wraps mod 2^64, as a uint64 counter does
            assert got[b, j] == philox_uniform(int(seeds[b]), (int(counters[b]) + j) % 2**64), (b, j)
    many = uniforms(99, 100_000)
    assert many.min() >= 0.0 and many.max() < 1.0 and abs(many.mean() - 0.5) < 0.005
    few = philox_uniforms(seeds[:3], counters[:3], 2)  # few draws: the scalar loop, same numbers
    assert np.array_equal(few, got[:3, :2]) and few.shape == (3, 2)
    with pytest.raises(ValueError, match="uint64"):
        philox_uniforms(seeds, counters[:3])


# ------------------------------------------------------------------------------------------------
# exp

def test_portable_exp_is_within_one_ulp_and_flushes_below_exp_min():
    rng = np.random.default_rng(0)
    z = np.concatenate([-rng.exponential(3.0, 100_000), -rng.uniform(0, -EXP_MIN, 100_000),
                        [0.0, -0.0, EXP_MIN, -1e-300, -5e-324, -0.5 * math.log(2), -math.log(2)]])
    got = portable_exp(z)
    want = np.array([math.exp(v) for v in z])
    assert np.abs(got.view(np.int64) - want.view(np.int64)).max() <= 1
    assert portable_exp(np.array([0.0]))[0] == 1.0
    assert portable_exp(np.array([np.nextafter(EXP_MIN, -np.inf), -1000.0, -np.inf])).tolist() == [0.0] * 3
    assert portable_exp(np.array([EXP_MIN]))[0] > 2.0 ** -1022  # never subnormal
    # A few exact results: docs/sampling.md lists them for reimplementations to check against.
    assert portable_exp(np.array([-1.0, -0.5, -10.0, -700.0])).tolist() == [
        0.36787944117144233, 0.6065306597126334, 4.539992976248485e-05,  # exp(-10): 1 ulp below exact
        9.85967654375977e-305]


# ------------------------------------------------------------------------------------------------
# The rule

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"temperature": 1e39}, "temperature"),  # float32 overflow: inf
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1e-50}, "top_p"),  # 0 as the float32 the wire carries, so the server refuses it too
    ({"top_p": 1.01}, "top_p"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert field in str(e.value)


def test_temperature_and_top_p_are_the_float32_the_wire_carries():
    p = SamplingParams(temperature=0.8, top_p=0.9)
    assert p.temperature == float(np.float32(0.8)) != 0.8
    assert p.top_p == float(np.float32(0.9))
    assert SamplingParams(temperature=1e-50).greedy  # as the server sees it


def test_greedy_is_argmax_ties_to_lowest_id_whatever_u():
    for u in (0.0, 0.5, 1 - 2**-53):
        assert sample(LOGITS, SamplingParams(temperature=0), u) == 1
        assert sample(np.array([1.0, 3.0, 3.0]), SamplingParams(temperature=0), u) == 1


def test_boundaries_of_the_rule():
    """Four equal logits weigh 1 each, so cum = [1, 2, 3, 4] exactly and the boundaries are exact."""
    flat = np.zeros(4, np.float32)
    p = SamplingParams()
    edges = (0.0, 0.25 - 2**-54, 0.25, 0.5, 0.75, 1 - 2**-53)
    assert [sample(flat, p, u) for u in edges] == [0, 0, 1, 2, 3, 3]
    # top_p: the smallest prefix whose mass reaches top_p; reaching it exactly is enough.
    assert sample(flat, SamplingParams(top_p=0.5), 1 - 2**-53) == 1
    assert sample(flat, SamplingParams(top_p=0.5000001), 1 - 2**-53) == 2
    assert sample(flat, SamplingParams(top_p=1e-6), 0.99) == 0
    # top_k: the first k in descending order; k beyond the vocabulary keeps all.
    assert sample(flat, SamplingParams(top_k=2), 0.99) == 1
    assert sample(flat, SamplingParams(top_k=100), 0.99) == 3
    # Unfiltered rows take the ids in id order: w = [e^-2, 1, 1, 0], cum = [0.135, 1.135, 2.135, 2.135].
    tied = np.array([1.0, 3.0, 3.0, -np.inf])
    total = np.exp(-2.0) + 2
    assert [sample(tied, p, u) for u in (0.0, 0.06, 0.07, 0.53, 0.54, 0.99)] == [0, 0, 1, 1, 2, 2]
    assert [np.exp(-2.0) / total, (1 + np.exp(-2.0)) / total] == pytest.approx([0.0634, 0.5317], abs=1e-4)
    for top_k in (0, 4, 5):  # top_k >= V filters nothing: the same id order
        assert sample(tied, SamplingParams(top_k=top_k), 1 - 2**-53) == 2  # -inf weighs 0: never picked
    # A filtering row (top_k < V or top_p < 1) takes descending logit order, ties by id: [1, 2, 0, 3].
    assert [sample(tied, SamplingParams(top_k=3), u) for u in (0.0, 0.46, 0.47, 0.99)] == [1, 1, 2, 0]
    assert [sample(tied, SamplingParams(top_p=0.99), u) for u in (0.0, 0.46, 0.47, 0.99)] == [1, 1, 2, 0]
    assert sample(np.array([-np.inf, 1.0]), p, 0.0) == 1  # a zero weight first is never picked either


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, np.float64) / t))


def test_temperature_one_matches_softmax():
    assert np.abs(frequencies(SamplingParams()) - softmax(LOGITS)).max() < 0.02


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        expected = softmax(LOGITS, t)
        assert np.abs(frequencies(SamplingParams(temperature=t)) - expected).max() < 0.02
    sharp, flat = frequencies(SamplingParams(temperature=0.5)), frequencies(SamplingParams(temperature=2.0))
    assert sharp[1] > 0.6 > flat[1]


def test_top_k_keeps_only_the_k_best_renormalised():
    f = frequencies(SamplingParams(top_k=2))
    assert f[0] == 0 and f[2] == 0
    assert abs(f[1] - 0.5 / 0.8) < 0.02 and abs(f[3] - 0.3 / 0.8) < 0.02
    assert set(np.flatnonzero(frequencies(SamplingParams(top_k=1)))) == {1}
    assert np.abs(frequencies(SamplingParams(top_k=100)) - softmax(LOGITS)).max() < 0.02


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    f = frequencies(SamplingParams(top_p=0.75))  # 0.5 < 0.75 <= 0.5 + 0.3
    assert f[0] == 0 and f[2] == 0
    assert abs(f[1] - 0.5 / 0.8) < 0.02
    assert set(np.flatnonzero(frequencies(SamplingParams(top_p=0.01)))) == {1}
    f = frequencies(SamplingParams(top_p=0.9))  # needs 0.5 + 0.3 + 0.15
    assert f[0] == 0 and abs(f[2] - 0.15 / 0.95) < 0.02


def test_top_k_then_top_p():
    # top_k=3 renormalises to 0.5/.95, .3/.95, .15/.95 = .526, .316, .158; top_p=0.8 keeps the first two.
    f = frequencies(SamplingParams(top_k=3, top_p=0.8))
    assert set(np.flatnonzero(f)) == {1, 3}


def test_nan_logits_are_rejected_infinities_follow_ieee_arithmetic():
    for params in (SamplingParams(), SamplingParams(temperature=0)):
        with pytest.raises(ValueError, match="NaN"):
            sample(np.array([0.0, np.nan]), params, 0.5)
        # An infinite maximum (a +inf logit, or all -inf) picks the argmax, ties to the lowest id.
        for q in (params, SamplingParams(top_k=2), SamplingParams(top_p=0.5)):
            assert sample(np.array([0.0, np.inf, np.inf]), q, 0.99) == 1
            assert sample(np.array([-np.inf, -np.inf]), q, 0.99) == 0


def random_case(rng: np.random.Generator, rows: int, vocab: int):
    """Logits with ties (also at the top), -inf entries and huge ranges; every kind of parameter."""
    scale = rng.choice([0.01, 1.0, 30.0, 1e4], (rows, 1))
    logits = (rng.normal(0, 1, (rows, vocab)) * scale).astype(np.float32)
    logits[::5, :3] = logits[::5, :1]
    logits[::7] = np.round(logits[::7])
    if vocab > 3:
        logits[::11, -2:] = -np.inf
    logits[17::19, 1] = np.inf
    logits[18::19] = -np.inf
    temps = [0.0, 1e-30, 1e-6, 0.01, 0.7, 1.0, 3.0, 100.0]
    params = [SamplingParams(temperature=float(rng.choice(temps)),
                             top_k=int(rng.choice([0, 1, 2, 5, vocab - 1, vocab, vocab + 7])),
                             top_p=float(rng.choice([1.0, 0.999, 0.9, 0.5, 1e-6, 1e-30])))
              for _ in range(rows)]
    u = rng.random(rows)
    u[::13] = 0.0
    u[1::13] = 1 - 2**-53
    return logits, params, u


def test_sample_rows_equals_sample_row_by_row_whatever_the_batch_mates():
    """Batched sampling = the one-row definition, whoever shares the engine call (thousands of rows)."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        rows, vocab = int(rng.integers(1, 65)), int(rng.choice([2, 3, 17, 60, 97]))
        logits, params, u = random_case(rng, rows, vocab)
        got = sample_rows(logits, params, u)
        want = [sample(logits[i], params[i], u[i]) for i in range(rows)]
        assert got.tolist() == want, f"trial {trial}"


def test_sample_rows_fails_only_the_nan_rows():
    logits = np.array([[0.0, 1.0], [np.nan, 0.0], [2.0, 0.0], [0.0, np.inf], [-np.inf, -np.inf]])
    greedy = SamplingParams(temperature=0)
    params = [greedy, SamplingParams(), greedy, SamplingParams(), greedy]
    assert sample_rows(logits, params, np.full(5, 0.5)).tolist() == [1, -1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"float\[B, V\]"):
        sample_rows(logits, [greedy], np.zeros(1))


def test_log_softmax_is_stable_and_normalised():
    x = np.array([[1000.0, 1001.0, 999.0], [0.0, 0.0, 0.0]])
    ls = log_softmax(x)
    assert np.isfinite(ls).all()
    assert np.allclose(np.exp(ls).sum(axis=-1), 1.0)
    assert np.allclose(ls[1], -np.log(3.0))


def test_float32_rounding_is_numpys_everywhere():
    """The wire's float32 rounding, done without numpy on the request path, equals numpy's cast for
    doubles of every magnitude: subnormals, ties, the overflow edge, infinities, NaN, ints and numpy types."""
    from nextchar.server.core.sampling import _float32

    rng = np.random.default_rng(11)
    values = list(rng.normal(0, 1, 2000) * 10.0 ** rng.integers(-50, 50, 2000))
    values += list(np.frombuffer(rng.bytes(8 * 2000), np.float64))  # any bit pattern
    f32_max = float(np.finfo(np.float32).max)
    values += [0.0, -0.0, 1e-46, -1e-46, 1.4e-45, f32_max, np.nextafter(f32_max, np.inf),
               3.4028235677973366e38, 3.4028236e38, 1e39, -1e39, np.inf, -np.inf, 1 + 2.0**-24,
               1 + 3 * 2.0**-24, 0.8, 2**100, -(2**200), np.int64(7), np.float32(0.9), np.float16(0.1)]

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))

    with np.errstate(over="ignore"):
        for v in values:
            assert same(_float32(v), float(np.float32(float(v)))), v
    assert _float32(10**400) == math.inf and _float32(-(10**400)) == -math.inf  # past even a double
    # numpy scalars wider than a double are rounded once, as numpy does (not through a double first)
    with np.errstate(over="ignore"):
        wide = np.longdouble(1) + np.longdouble(2.0**-24) + np.longdouble(2.0**-60)
        for v in (np.int64(2**60 + 2**36 + 1), np.uint64(2**63 + 2**39 + 1), wide):
            assert _float32(v) == float(np.float32(v)), v
