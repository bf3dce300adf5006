"""Chunked prefill and chunked scoring give what one whole-text engine call gives (issue 13.2)."""

from __future__ import annotations

import numpy as np
import pytest
from fake_engine import FakeEngine

from nextchar.server.core import scoring
from nextchar.server.core.prefill import prefill
from nextchar.server.core.sampling import log_softmax


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_prefill_keeps_the_last_logits_and_state_of_the_whole_call(chunk: int) -> None:
    engine = FakeEngine()
    tokens = np.random.default_rng(1).integers(0, engine.vocab_size, (3, 100), dtype=np.int64)
    whole, whole_state = engine.step(tokens, engine.initial_state(3))
    engine.calls.clear()
    last, state = prefill(engine, tokens, engine.initial_state(3), chunk=chunk)
    assert last.shape == (3, engine.vocab_size)
    np.testing.assert_allclose(last, whole[:, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state[0], whole_state[0], rtol=1e-5, atol=1e-5)
    assert max(t for _, t in engine.calls) == min(chunk, 100)  # no engine call saw more than a chunk


@pytest.mark.parametrize("context", ["", "bad cafe "])
def test_chunked_score_equals_the_whole_text_score(monkeypatch, context: str) -> None:
    engine = FakeEngine()
    rng = np.random.default_rng(2)
    text = "".join(engine.vocab[i] for i in rng.integers(0, engine.vocab_size, 300))
    monkeypatch.setattr(scoring, "PREFILL_CHUNK", 16)
    chunked = scoring.score(engine, text, context=context, per_char=True)
    assert max(t for _, t in engine.calls) == 16
    # Reference: one call on context + text[:-1], as score did before chunking.
    ids = np.array([engine.vocab_index[c] for c in context + text], np.int64)
    first = max(len(context), 1)
    logits, _ = engine.step(ids[None, :-1], engine.initial_state(1))
    rows = log_softmax(logits[0, first - 1:])
    want = rows[np.arange(ids.size - first), ids[first:]]
    assert chunked.scored_chars == want.size
    np.testing.assert_allclose([lp for _, lp in chunked.per_char], want, rtol=1e-6, atol=1e-6)
    assert chunked.log_likelihood_nats == pytest.approx(float(want.sum()), rel=1e-6)
