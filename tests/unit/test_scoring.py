"""predict and score against a hand-rolled char-by-char computation on a fake recurrent model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from fake_engine import FakeEngine

from nextchar.server.core.sampling import InvalidParameterError, log_softmax
from nextchar.server.core.scoring import predict, score
from nextchar.server.core.vocab import OutOfVocabularyError


def char_by_char_logprobs(engine: FakeEngine, text: str) -> list[float]:
    """log p(text[i] | text[:i]) for i >= 1, one engine call per character."""
    state, out = engine.initial_state(1), []
    for prev, nxt in itertools.pairwise(text):
        logits, state = engine.step(np.array([[engine.vocab_index[prev]]]), state)
        out.append(float(log_softmax(logits[0, -1])[engine.vocab_index[nxt]]))
    return out


def test_score_without_context_scores_every_char_after_the_first():
    engine = FakeEngine()
    expected = char_by_char_logprobs(engine, "bad cafe")
    engine.calls.clear()
    r = score(engine, "bad cafe", per_char=True)
    assert engine.calls == [(1, 7)]
    assert r.scored_chars == 7
    assert r.log_likelihood_nats == pytest.approx(sum(expected), abs=1e-5)
    assert r.nats_per_char == pytest.approx(-sum(expected) / 7, abs=1e-6)
    assert r.bits_per_char == pytest.approx(r.nats_per_char / math.log(2))
    assert r.perplexity == pytest.approx(math.exp(r.nats_per_char))
    assert [c for c, _ in r.per_char] == list("ad cafe")
    assert np.allclose([lp for _, lp in r.per_char], expected, atol=1e-5)


def test_score_with_context_scores_the_whole_text():
    engine = FakeEngine()
    expected = char_by_char_logprobs(engine, "bad cafe")
    r = score(engine, "d cafe", context="ba")
    assert r.scored_chars == 6 and r.per_char is None
    assert r.log_likelihood_nats == pytest.approx(sum(expected[1:]), abs=1e-5)


def test_score_needs_something_to_condition_on():
    with pytest.raises(InvalidParameterError, match="two characters"):
        score(FakeEngine(), "a")
    with pytest.raises(OutOfVocabularyError):
        score(FakeEngine(), "abZ")


def predict_next(engine, context: str, n: int) -> list[tuple[str, float]]:
    return [(p.char, p.probability) for p in predict(engine, context, n)]


def test_predict_returns_the_most_probable_chars():
    engine = FakeEngine()
    logits, _ = engine.step(np.array([[engine.vocab_index[c] for c in "bad"]]), engine.initial_state(1))
    probs = np.exp(log_softmax(logits[0, -1]))
    best = predict_next(engine, "bad", 3)
    assert [c for c, _ in best] == [engine.vocab[i] for i in np.argsort(-probs)[:3]]
    assert np.allclose([p for _, p in best], np.sort(probs)[::-1][:3])
    everything = predict_next(engine, "bad", engine.vocab_size)
    assert len(everything) == engine.vocab_size
    assert sum(p for _, p in everything) == pytest.approx(1.0)
    for n in (0, engine.vocab_size + 1):  # the server's rule too: n is at most the vocabulary size
        with pytest.raises(InvalidParameterError, match=r"n: .*the vocabulary size"):
            predict_next(engine, "bad", n)


def test_predict_gives_ids_and_stable_logprobs():
    engine = FakeEngine()
    preds = predict(engine, "bad", 3, temperature=0.01)
    assert [p.token_id for p in preds] == [engine.vocab_index[p.char] for p in preds]
    assert preds[0].logprob <= 0 and np.isfinite([p.logprob for p in preds]).all()
    assert preds[2].probability == pytest.approx(np.exp(preds[2].logprob))
