"""Sampling: parameter validation, greedy, and the distributions of temperature / top-k / top-p."""

from __future__ import annotations

import numpy as np
import pytest

from nextchar.server.core.sampling import (
    InvalidParameterError,
    SamplingParams,
    log_softmax,
    sample,
    sample_rows,
    softmax,
    top_n,
)

LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], dtype=np.float64)).astype(np.float32)
DRAWS = 8_000


def frequencies(params: SamplingParams, logits=LOGITS, seed: int = 1234) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    counts = np.bincount([sample(logits, params, rng) for _ in range(DRAWS)], minlength=len(logits))
    return counts / DRAWS


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert field in str(e.value)


def test_greedy_is_argmax_ties_to_lowest_id_and_draws_nothing():
    rng = np.random.Generator(np.random.PCG64(7))
    before = rng.bit_generator.state
    assert sample(LOGITS, SamplingParams(temperature=0), rng) == 1
    assert sample(np.array([1.0, 3.0, 3.0]), SamplingParams(temperature=0), rng) == 1
    assert rng.bit_generator.state == before


def test_one_draw_per_sample_whatever_the_filters():
    for params in (SamplingParams(), SamplingParams(top_k=2), SamplingParams(top_p=0.3, temperature=0.5)):
        a = np.random.Generator(np.random.PCG64(3))
        b = np.random.Generator(np.random.PCG64(3))
        sample(LOGITS, params, a)
        b.random()
        assert a.bit_generator.state == b.bit_generator.state


def test_same_seed_same_draws():
    assert np.array_equal(frequencies(SamplingParams(), seed=5), frequencies(SamplingParams(), seed=5))


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


def test_nan_logits_rejected():
    with pytest.raises(ValueError, match="NaN"):
        sample(np.array([0.0, np.nan]), SamplingParams(), np.random.default_rng(0))


def test_sample_rows_matches_one_row_sampling_whatever_the_batch_mates():
    """Batched sampling = the unbatched loop's `sample`, row by row, whoever shares the engine call."""
    mix = [SamplingParams(temperature=t, top_k=k, top_p=q)
           for t in (0.0, 0.01, 0.7, 1.0, 100.0) for k in (0, 1, 5) for q in (1.0, 0.9)]
    data = np.random.default_rng(7)
    rows, vocab = 64, 60
    params = [mix[i % len(mix)] for i in range(rows)]
    batched = [np.random.Generator(np.random.PCG64(i)) for i in range(rows)]
    alone = [np.random.Generator(np.random.PCG64(i)) for i in range(rows)]
    for tick in range(200):
        logits = (data.normal(0, 1 + tick % 7, (rows, vocab))).astype(np.float32)
        logits[::9, :3] = logits[::9, :1]  # ties, also at the top
        logits[::13] = np.round(logits[::13])
        n = 1 + tick % rows  # batches of every size, each a different slice of the streams
        got = sample_rows(logits[:n], params[:n], batched[:n])
        want = [sample(logits[i], params[i], alone[i]) for i in range(n)]
        assert got.tolist() == want, f"tick {tick}"


def test_sample_rows_fails_only_the_nan_row():
    logits = np.array([[0.0, 1.0], [np.nan, 0.0], [2.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    rngs = [np.random.default_rng(i) for i in range(3)]
    assert sample_rows(logits, [greedy, SamplingParams(), greedy], rngs).tolist() == [1, -1, 0]
    with pytest.raises(ValueError, match=r"float\[B, V\]"):
        sample_rows(logits, [greedy], rngs[:1])


def test_log_softmax_is_stable_and_normalised():
    x = np.array([[1000.0, 1001.0, 999.0], [0.0, 0.0, 0.0]])
    ls = log_softmax(x)
    assert np.isfinite(ls).all()
    assert np.allclose(np.exp(ls).sum(axis=-1), 1.0)
    assert np.allclose(ls[1], -np.log(3.0))


def test_top_n_orders_by_probability_ties_to_lower_id():
    best = top_n(np.array([0.0, 2.0, 1.0, 2.0]), 3)
    assert [i for i, _ in best] == [1, 3, 2]
    assert best[0][1] == pytest.approx(np.exp(2) / (1 + 2 * np.exp(2) + np.exp(1)))
    with pytest.raises(InvalidParameterError):
        top_n(LOGITS, 0)
