"""A session's completion and keystrokes when a step fails or the server drains, on a real server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_harness import wait_until

from nextchar.client.client import NextCharClient
from nextchar.client.errors import InvalidArgument, ResourceExhausted, Unavailable
from nextchar.server.scheduling.runner import OverloadedError


def _same(session_preds, full_preds) -> None:
    assert [p.char for p in session_preds] == [p.char for p in full_preds]
    for a, b in zip(session_preds, full_preds, strict=True):
        assert abs(a.probability - b.probability) <= 1e-5


def _occupy(server, n: int) -> None:
    """Take (n > 0) or give back (n < 0) n of the runner's slots, on the server's own loop: the count is
    the loop's, and a change from this thread could lose one of its own updates."""
    async def change() -> None:
        server.runner.in_flight += n

    server.run(change())


def test_an_accept_whose_step_fails_keeps_the_completion(make_server) -> None:
    """An accept refused RESOURCE_EXHAUSTED (--max-concurrent taken: its 20 chars step on a worker) changes
    nothing, as its answer says: the retry appends the completion (it was cleared before the step ran,
    and the retry was INVALID_ARGUMENT 'no completion to accept')."""
    server = make_server(max_concurrent=1)
    with NextCharClient(server.address, timeout=30) as c, c.session("lstm", n=3, text="O sa") as s:
        text = "".join(s.complete(20, temperature=0.0))
        assert len(text) == 20
        _occupy(server, 1)  # as if another call held the only slot
        try:
            with pytest.raises(ResourceExhausted, match="max_concurrent=1"):
                s.accept()
        finally:
            _occupy(server, -1)
        accepted = s.accept()
        assert accepted.text_chars == 4 + 20
        _same(accepted.predictions, c.predict_next("lstm", "O sa" + text, 3))


def test_a_completion_that_fails_partway_leaves_nothing_to_accept(make_server) -> None:
    """Completion B streams text, then fails with an error the session survives (injected: no engine
    failure of today is one): an accept must not append the earlier completion A, which the client no
    longer has in view. A completion refused before any text (RESOURCE_EXHAUSTED) leaves A acceptable."""
    server = make_server(model_instances=1)
    engine = server.server.servicer.registry.cached("lstm").engine
    real, calls = engine.generate, []

    def fails_on_its_second_call(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OverloadedError("injected: the engine call was refused")
        return real(*args)

    with NextCharClient(server.address, timeout=30) as c, c.session("lstm", n=0, text="O sa") as s:
        a = "".join(s.complete(10, temperature=0.0))
        _occupy(server, server.runner.max_concurrent)  # B refused at admission: nothing seen
        try:
            with pytest.raises(ResourceExhausted, match="max_concurrent"):
                list(s.complete(10))
        finally:
            _occupy(server, -server.runner.max_concurrent)
        assert s.accept().text_chars == 4 + len(a) == 14  # A, still
        assert "".join(s.complete(10, temperature=0.0))
        engine.generate = fails_on_its_second_call
        seen = []
        try:
            with pytest.raises(ResourceExhausted, match="injected"):
                for piece in s.complete(200, temperature=0.0):
                    seen.append(piece)
        finally:
            engine.generate = real
        assert seen and len(calls) == 2
        with pytest.raises(InvalidArgument, match="no completion to accept"):
            s.accept()
        assert s.append("y").text_chars == 15  # the session goes on


def test_a_keystroke_refused_by_the_drain_ends_counted_as_drain(make_server) -> None:
    """A keystroke waiting for the engine (behind another session's step, held) when the drain begins is
    refused by the runner (UNAVAILABLE): its session is counted ended by the drain, as the session that
    was waiting for its client is, and in nextchar_session_evictions{reason="drain"} (it was "error")."""
    server = make_server(model_instances=1)
    sessions = server.server.servicer.sessions
    engine = server.server.servicer.registry.cached("lstm").engine
    release, real = threading.Event(), engine.step

    def held(tokens, state):
        assert release.wait(30)
        return real(tokens, state)

    metrics = server.server.ops.metrics.registry
    with NextCharClient(server.address, timeout=30) as c, ThreadPoolExecutor(2) as pool:
        a, b = c.session("lstm", n=1), c.session("lstm", n=1)
        idle = c.session("lstm", n=1)
        engine.step = held
        try:
            pasting = pool.submit(a.append, "O say can")  # on a worker (the engine is not measured yet)
            wait_until(lambda: server.runner.in_flight == 1, 10, "a's step to run")
            typing = pool.submit(b.append, "O")
            wait_until(lambda: sessions.steps._waiting.get(id(engine)), 10, "b's step to queue")
            drained = server.submit(server.server.shutdown(10.0))
            wait_until(lambda: server.runner.draining, 10, "the drain to begin")
        finally:
            release.set()
            engine.step = real
        assert pasting.result(10).text_chars == 9  # admitted before the drain: it ran
        with pytest.raises(Unavailable, match="shutting down"):
            typing.result(10)
        assert drained.result(20)
        with pytest.raises(Unavailable):
            idle.append("x")
    assert sessions.table.ended == {"drain": 3}
    assert metrics.get_sample_value("nextchar_session_evictions_total", {"reason": "drain"}) == 3
