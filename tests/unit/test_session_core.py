"""TypingSession (prepare / step / commit, saved states, bounds) and StepCoalescer (shared engine calls)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fake_engine import FakeEngine

from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.core.session import SessionLimits, SessionTextLimitError, TypingSession
from nextchar.server.scheduling.session_steps import StepCoalescer


def _apply(engine: FakeEngine, session: TypingSession, step) -> int:
    """Run a prepared step on the engine directly; the characters it read."""
    logits, state = step.logits, step.state
    if step.tokens.size:
        out, state = engine.step(step.tokens[None], state or engine.initial_state(1))
        logits = out[0, -1]
    session.commit(step, logits, state)
    return int(step.tokens.size)


def _full(engine: FakeEngine, text: str) -> np.ndarray:
    ids = np.array([[engine.vocab_index[c] for c in text]], np.int64)
    return engine.step(ids, engine.initial_state(1))[0][0, -1]


def test_appends_step_only_new_chars_and_deletes_restore_saved_states() -> None:
    engine = FakeEngine()
    s = TypingSession(engine.vocab, engine.vocab_index, SessionLimits(max_chars=100, saved_states=4))
    for ch in "abcdefgh":
        assert _apply(engine, s, s.append(s.encode(ch, "append"))) == 1
    np.testing.assert_allclose(s.logits, _full(engine, "abcdefgh"), atol=1e-6)
    assert _apply(engine, s, s.delete(3)) == 0  # length 5 is one of the last 4 saved (5..8)
    np.testing.assert_allclose(s.logits, _full(engine, "abcde"), atol=1e-6)
    assert _apply(engine, s, s.delete(3)) == 2  # nothing saved below 5: re-read "ab" from zero
    assert s.text == "ab"
    np.testing.assert_allclose(s.logits, _full(engine, "ab"), atol=1e-6)
    assert _apply(engine, s, s.reset()) == 0 and s.logits is None and s.state is None and s.length == 0


def test_a_prepared_step_changes_nothing_until_committed_and_bounds_hold() -> None:
    engine = FakeEngine()
    s = TypingSession(engine.vocab, engine.vocab_index, SessionLimits(max_chars=4, saved_states=2))
    _apply(engine, s, s.append(s.encode("abc", "append")))
    s.delete(2)
    assert s.text == "abc"
    with pytest.raises(SessionTextLimitError, match="at most 4"):
        s.append(s.encode("de", "append"))
    with pytest.raises(InvalidParameterError, match=r"\[1, 3\]"):
        s.delete(4)
    assert s.nbytes == 8 * 3 + s.state[0].nbytes + s.logits.nbytes  # the current state is also saved


def test_concurrent_steps_of_equal_length_share_one_engine_call() -> None:
    engine = FakeEngine()

    async def offload(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def run() -> list:
        steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True)
        first = asyncio.ensure_future(steps.step(engine, np.array([1]), None))
        await asyncio.sleep(0)  # the first starts alone; the next four wait for it and go together
        rest = [steps.step(engine, np.array([t]), None) for t in (2, 3, 4)]
        rest.append(steps.step(engine, np.array([1, 2]), None))  # another length: its own call
        return [await first, *await asyncio.gather(*rest)], steps

    results, steps = asyncio.run(run())
    assert sorted(engine.calls) == [(1, 1), (1, 2), (3, 1)] and steps.rows == 5 and steps.calls == 3
    for (logits, state), text in zip(results, ["b", "c", "d", "e", "bc"], strict=True):
        np.testing.assert_allclose(logits, _full(engine, text), atol=1e-6)
        assert state[0].shape == (1, 1, engine.hidden_size)
