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
    """Run a prepared step on the engine directly (its checkpoint first, as the edge does); the
    characters it read."""
    logits, state, kept = step.logits, step.state, None
    for part in (step.tokens[:step.keep], step.tokens[step.keep:]):
        if part.size:
            out, state = engine.step(part[None], state or engine.initial_state(1))
            logits = out[0, -1]
            if kept is None and step.keep:
                kept = logits, state
    session.commit(step, logits, state, kept)
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


def test_a_long_step_keeps_a_checkpoint_so_repeated_deletes_re_read_little() -> None:
    """A paste of 1,000 chars keeps the state at 768 (the last multiple of PREFILL_CHUNK): "delete 2,
    append 1" over and over re-reads from there, not the whole text each time; within the same
    `saved_states` bound. Below the checkpoint, one re-read from the start keeps the next one (512)."""
    engine = FakeEngine()
    s = TypingSession(engine.vocab, engine.vocab_index, SessionLimits(max_chars=2000, saved_states=4))
    text = ("abcdefgh \n" * 100)[:1000]
    paste = s.append(s.encode(text, "append"))
    assert paste.keep == 768 and _apply(engine, s, paste) == 1000
    read = []
    for _ in range(240):
        read.append(_apply(engine, s, s.delete(2)))
        _apply(engine, s, s.append(s.encode("a", "append")))
        assert len(s._saved) <= 4
    assert read[:231] == list(range(230, -1, -1))  # from 768 (before: 998, 997, ... from the start)
    assert read[231] == 767 and max(read[232:]) < 256  # under 768: once from the start, then from 512
    np.testing.assert_allclose(s.logits, _full(engine, s.text), atol=1e-5)
    assert s.append(s.encode("ab", "append")).keep == 0  # keystrokes are never split


def test_concurrent_steps_of_equal_length_share_one_engine_call() -> None:
    engine = FakeEngine()

    async def offload(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def run() -> list:
        steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1.0)
        first = asyncio.ensure_future(steps.step(engine, np.array([1]), None))
        await asyncio.sleep(0)  # the first starts alone; the next four, queued in one turn, go together
        rest = [steps.step(engine, np.array([t]), None) for t in (2, 3, 4)]
        rest.append(steps.step(engine, np.array([1, 2]), None))  # another length: its own call
        return [await first, *await asyncio.gather(*rest)], steps

    results, steps = asyncio.run(run())
    assert sorted(engine.calls) == [(1, 1), (1, 2), (3, 1)] and steps.rows == 5 and steps.calls == 3
    assert steps.inline_calls == 2  # the first call measured the engine; the rest ran on the loop
    for (logits, state), text in zip(results, ["b", "c", "d", "e", "bc"], strict=True):
        np.testing.assert_allclose(logits, _full(engine, text), atol=1e-6)
        assert state[0].shape == (1, 1, engine.hidden_size)


def test_steps_run_inline_only_when_their_measured_cost_fits() -> None:
    """A call the engine's measured cost says is short runs on the event loop thread (no hand-off to a
    worker); the first call of an engine, a paste, and calls estimated past inline_s go to the worker. Both
    give the same results, and an engine error reaches the callers of its own batch only."""
    engine = FakeEngine()
    threads: list[str] = []

    async def offload(fn, *args):
        def run():
            threads.append("worker")
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def run(steps: StepCoalescer, texts: list[str]) -> list:
        out = []
        for text in texts:
            ids = np.array([engine.vocab_index[c] for c in text])
            out.append(await steps.step(engine, ids, None))
        return out

    texts = ["ab", "c", "hg", "a" * 300]
    steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1.0)
    results = asyncio.run(run(steps, texts))
    # The unmeasured first call and the 300-char paste (longer than INLINE_MAX_CHARS) go to the worker.
    assert threads == ["worker"] * 2 and steps.inline_calls == 2
    for (logits, _), text in zip(results, texts, strict=True):
        np.testing.assert_allclose(logits, _full(engine, text), atol=1e-6)

    threads.clear()
    tight = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1e-12)
    asyncio.run(run(tight, texts))
    assert threads == ["worker"] * 4 and tight.inline_calls == 0  # never cheap enough

    class Failing(FakeEngine):
        def step(self, tokens, state):
            if tokens.shape[1] == 2:
                raise RuntimeError("engine failed")
            return super().step(tokens, state)

    async def failing() -> tuple:
        bad = Failing()
        steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1.0)
        await steps.step(bad, np.array([1]), None)  # measured: later calls run inline
        outcomes = await asyncio.gather(steps.step(bad, np.array([1, 2]), None),
                                        steps.step(bad, np.array([3]), None), return_exceptions=True)
        return outcomes, steps.inline_calls
    (error, ok), inline = asyncio.run(failing())
    assert isinstance(error, RuntimeError) and isinstance(ok, tuple) and inline == 2


def test_session_wait_gathers_steps_while_other_sessions_type() -> None:
    """--session-wait-ms: when the engine's last call carried another session's step less than the
    wait ago, a step waits that long and steps arriving meanwhile share its call. A step after a quiet
    spell, a session whose own step was the last call, and any step without the setting go at once."""
    async def offload(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def at_once(steps: StepCoalescer, engine: FakeEngine, token: int, who: object) -> bool:
        pending = asyncio.ensure_future(steps.step(engine, np.array([token]), None, caller=who))
        for _ in range(3):  # the task starts, the flush runs inline (the engine is measured), it ends
            await asyncio.sleep(0)
        done = pending.done()
        await pending
        return done

    async def run(wait_s: float) -> tuple[list, list[bool]]:
        engine = FakeEngine()
        a, b = object(), object()
        steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1.0, wait_s=wait_s)
        await steps.step(engine, np.array([0]), None, caller=a)  # the model was idle: at once
        first = asyncio.ensure_future(steps.step(engine, np.array([1]), None, caller=b))  # a typed: waits
        await asyncio.sleep(0.01)
        second = await steps.step(engine, np.array([2]), None, caller=a)
        np.testing.assert_allclose(second[0], _full(FakeEngine(), "c"), atol=1e-6)  # same weights
        await first
        shared = list(engine.calls)
        now = [await at_once(steps, engine, 3, a)]   # the last call carried b: a waits (not at once)
        await asyncio.sleep(wait_s)
        now.append(await at_once(steps, engine, 3, a))  # quiet for the wait: at once
        now.append(await at_once(steps, engine, 4, a))  # its own step was the last call: at once
        return shared, now

    shared, now = asyncio.run(run(0.2))
    assert shared == [(1, 1), (2, 1)] and now == [False, True, True]
    shared, now = asyncio.run(run(0.0))
    assert shared == [(1, 1)] * 3 and now == [True] * 3


def test_a_refused_inline_call_fails_its_steps_only_and_row_views_are_copied() -> None:
    """check() (the runner's "not draining") refuses an inline call as the offload would: its callers
    get the error and the engine is not left busy. A lone row's state that is a view into a padded
    batch (engines that pad single rows) is copied, so a saved state holds only its own row."""
    class Padded(FakeEngine):
        def step(self, tokens, state):
            logits, new = super().step(np.repeat(tokens, 2, axis=0), tuple(np.repeat(s, 2, axis=1)
                                                                          for s in state))
            return logits[:1], tuple(s[:, :1] for s in new)  # views, as Engine.step's take() gives

    async def offload(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    refuse = [False]

    def check() -> None:
        if refuse[0]:
            raise RuntimeError("draining")

    async def run() -> tuple:
        engine = Padded()
        steps = StepCoalescer(offload, max_rows=8, may_batch=lambda e: True, inline_s=1.0, check=check)
        await steps.step(engine, np.array([1]), None)  # measured on a worker
        refuse[0] = True
        with pytest.raises(RuntimeError, match="draining"):
            await steps.step(engine, np.array([2]), None)
        refuse[0] = False
        return await steps.step(engine, np.array([3]), None)

    logits, state = asyncio.run(run())
    np.testing.assert_allclose(logits, _full(FakeEngine(), "d"), atol=1e-6)
    assert state[0].base is None and state[0].shape == (1, 1, 8)


def test_a_session_whose_client_stops_reading_is_evicted_at_the_idle_ttl() -> None:
    """The idle TTL counts while the session waits on its client either way: for the next message, or
    for an answer to be taken (a client that sends but never reads blocks the server's write once flow
    control is full). It used to count only while reading, so such a session held its slot, its state
    and its model version for good."""
    import prometheus_client

    from nextchar.server.core.session import SessionOptions  # noqa: F401  (the service's own types)
    from nextchar.server.edge.session import SessionService
    from nextchar.server.ops.sessions import SessionTable
    from nextchar.v1 import inference_pb2 as pb

    engine = FakeEngine()

    class Model:
        name, version = "m", 1

    model = Model()
    model.engine = engine
    model.artifact = type("A", (), {"vocab": engine.vocab})()

    class Registry:
        def acquire(self, name, version):
            return model

        def release(self, m):
            pass

    class Steps:
        async def step(self, engine_, tokens, state, caller=None):
            logits, new = engine_.step(tokens[None], state if state is not None else engine_.initial_state(1))
            return logits[0, -1], new

    class Context:
        def peer(self):
            return "ipv4:127.0.0.1:1"

        def invocation_metadata(self):
            return ()

        def cancelled(self):
            return False

    async def resolve(ref, context):
        return model

    async def main() -> None:
        table = SessionTable(10, idle_ttl_s=0.05, registry=prometheus_client.CollectorRegistry())
        service = SessionService(Registry(), table, Steps(), None, None, SessionLimits(), resolve)

        async def requests():
            yield pb.SessionRequest(id=1, open=pb.SessionOpen(text="ab", options=pb.SessionOptions(n=2)))
            while True:  # the client keeps sending
                yield pb.SessionRequest(id=2, predict=pb.SessionPredict())

        async def blocked_writer() -> None:
            answers = service.serve(requests(), Context())
            try:
                await anext(answers)  # opened
                await asyncio.Event().wait()  # the write of the next answer never completes
            finally:
                await answers.aclose()

        task = asyncio.ensure_future(blocked_writer())
        await asyncio.sleep(0.01)
        assert len(table.active) == 1
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
        assert not table.active and table.ended.get("idle") == 1
        assert not table.waiting  # the ended stream's reader is not kept (it leaked, with its task)

    asyncio.run(main())
