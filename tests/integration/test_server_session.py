"""The Session RPC via the typed client against a real server: parity with PredictNext, edits, lifecycle."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from server_harness import wait_until

from nextchar.client.client import AsyncNextCharClient, NextCharClient
from nextchar.client.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

MODELS = ("lstm", "gru", "rnn")
TEXT = "O say can you see, by the dawn’s early light,"
TOL = 1e-5


@pytest.fixture(scope="module")
def client(server):
    with NextCharClient(server.address, timeout=30) as c:
        yield c


def _table(server):
    return server.server.servicer.sessions.table


def _same(session_preds, full_preds) -> None:
    assert [p.char for p in session_preds] == [p.char for p in full_preds]
    for a, b in zip(session_preds, full_preds, strict=True):
        assert abs(a.probability - b.probability) <= TOL and abs(a.logprob - b.logprob) <= TOL


@pytest.mark.parametrize("model", MODELS)
def test_every_keystroke_matches_predict_next_on_the_whole_text(client: NextCharClient, model: str) -> None:
    n = 8
    with client.session(model, n=n) as session:
        for i, ch in enumerate(TEXT, start=1):
            update = session.append(ch)
            assert update.text_chars == i and update.computed_chars == 1  # one step, not a re-read
            _same(update.predictions, client.predict_next(model, TEXT[:i], n))


@pytest.mark.parametrize("model", MODELS)
def test_delete_then_append_equals_a_fresh_session(client: NextCharClient, model: str) -> None:
    with client.session(model, n=6) as session:
        for ch in TEXT:
            session.append(ch)
        restored = session.delete(3)  # back to a length it passed through: a saved state
        assert restored.text_chars == len(TEXT) - 3 and restored.computed_chars == 0
        after = session.append("wry")
        assert after.computed_chars == 3  # one step of the three new characters
        far = session.delete(30)  # below the 16 saved states: re-read the 15 characters left
        assert far.text_chars == 15 and far.computed_chars == 15
        _same(far.predictions, client.predict_next(model, TEXT[:15], 6))
    edited = TEXT[:-3] + "wry"
    with client.session(model, n=6, text=edited) as fresh:
        _same(after.predictions, fresh.opened.predictions)
    _same(after.predictions, client.predict_next(model, edited, 6))


def test_a_delete_beyond_the_saved_states_re_reads_the_text(make_server, model_repo) -> None:
    server = make_server(session_saved_states=4)
    with NextCharClient(server.address, timeout=30) as c, c.session("gru", n=4) as session:
        for ch in TEXT[:20]:
            session.append(ch)
        near = session.delete(2)
        assert near.computed_chars == 0
        far = session.delete(10)  # saved: 15..18 (and 18 is the current end): re-read 8 chars from 0
        assert far.text_chars == 8 and far.computed_chars == 8
        _same(far.predictions, c.predict_next("gru", TEXT[:8], 4))


def test_repeated_small_deletes_after_a_paste_re_read_little(client: NextCharClient) -> None:
    """After a 1,000-char paste, "delete 2, append 1" re-reads from the state kept at 768 (the last
    multiple of PREFILL_CHUNK the paste passed), not the whole text each time (998, 997, ... before)."""
    text = (TEXT * 30)[:1000]
    with client.session("gru", n=4, text=text) as session:
        for i in range(40):
            deleted = session.delete(2)
            assert deleted.computed_chars == 1000 - 2 - i - 768, i
            session.append("O")
            text = text[:-2] + "O"
        assert session.text_chars == 960
        _same(session.predict(4), client.predict_next("gru", text, 4))


def test_a_completion_streams_and_leaves_the_session_unless_accepted(client: NextCharClient) -> None:
    with client.session("lstm", n=5, text="O say") as session:
        pieces = list(session.complete(40, temperature=0.8, top_k=10, seed=7))
        summary = session.summary
        reference = client.generate("lstm", "O say", 40, temperature=0.8, top_k=10, seed=7)
        assert "".join(pieces) == reference.text and summary.seed == 7
        assert summary.generated_chars == reference.summary.generated_chars
        unchanged = session.predict(5)
        _same(unchanged, client.predict_next("lstm", "O say", 5))
        accepted = session.accept()
        assert accepted.text_chars == 5 + len(reference.text)
        _same(accepted.predictions, client.predict_next("lstm", "O say" + reference.text, 5))


def test_completion_defaults_are_generates(client: NextCharClient) -> None:
    """No temperature means Generate's default (1), no seed means one drawn and reported, as in Generate."""
    with client.session("gru", n=0, text="O say") as session:
        text = "".join(session.complete(60, seed=11))
        assert text == client.generate("gru", "O say", 60, seed=11).text
        assert text != client.generate("gru", "O say", 60, seed=11, temperature=0.0).text


def test_a_bad_request_is_answered_and_the_session_goes_on(client: NextCharClient) -> None:
    with client.session("lstm", n=3, text="O sa") as session:
        with pytest.raises(InvalidArgument) as bad:
            session.append("€")
        assert bad.value.field_violations[0].field == "append"
        with pytest.raises(InvalidArgument, match="delete"):
            session.delete(99)
        with pytest.raises(InvalidArgument, match="max_new_chars"):
            list(session.complete(0))
        assert session.append("y").text_chars == 5


def test_a_completion_counts_against_the_memory_budget(make_server) -> None:
    """A completion reserves its estimate from --memory-budget-mb like any generation (it skipped the
    budget): past it, the session gets a RESOURCE_EXHAUSTED answer and goes on."""
    server = make_server(memory_budget_mb=16)
    budget = server.server.servicer.budget
    budget.reserved = budget.limit_bytes - (1 << 20)  # as if other calls held all but 1 MiB
    with NextCharClient(server.address, timeout=30) as client, client.session("lstm", n=3, text="O sa") as s:
        assert "".join(s.complete(20))  # a short one fits (~60 KB)
        with pytest.raises(ResourceExhausted, match="memory budget"):
            list(s.complete(5000))
        assert s.append("y").text_chars == 5


def test_the_first_message_must_be_open(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        call = stub.Session(iter([pb.SessionRequest(id=1, append="x")]), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "open" in e.value.details()


def test_a_disconnect_frees_the_state_at_once(client: NextCharClient, server) -> None:
    table = _table(server)
    before = table.ended.get("cancelled", 0) + table.ended.get("closed", 0)
    metrics = server.server.ops.metrics.registry
    session = client.session("lstm", n=2, text=TEXT)
    assert metrics.get_sample_value("nextchar_sessions_active") == 1
    assert metrics.get_sample_value("nextchar_session_state_bytes") > 0
    session._call.cancel()  # what a vanished client looks like to the server
    wait_until(lambda: not table.active, 10, f"the cancelled session freed (ended: {table.ended})")
    # grpc may deliver the cancel as the end of the request stream first: then it reads as "closed".
    assert table.ended.get("cancelled", 0) + table.ended.get("closed", 0) == before + 1, table.ended
    assert metrics.get_sample_value("nextchar_sessions_active") == 0
    assert metrics.get_sample_value("nextchar_session_state_bytes") == 0
    session = client.session("lstm", n=2, text=TEXT)
    session.close()  # a clean close ends the stream with OK
    assert not table.active and table.ended.get("closed", 0) >= 1


def test_max_sessions_idle_ttl_and_drain(make_server) -> None:
    server = make_server(max_sessions=2, session_idle_ttl=0.5)
    table = _table(server)
    with NextCharClient(server.address, timeout=30) as c:
        a, b = c.session("rnn", n=1, text="O"), c.session("rnn", n=1, text="O")
        with pytest.raises(ResourceExhausted, match="max_sessions=2"):
            c.session("rnn", n=1)
        # a keeps typing, b stays idle past the TTL: b is evicted, a is not.
        wait_until(lambda: a.append("a") and table.ended.get("idle") == 1, 10, "b evicted", interval=0.05)
        assert len(table.active) == 1
        with pytest.raises(DeadlineExceeded, match="idle"):
            b.append("a")
        server.run(server.server.shutdown(1.0))
        with pytest.raises(Unavailable):
            a.append("a")
        assert not table.active and table.ended.get("drain") == 1


def test_sessions_count_against_max_per_client(make_server) -> None:
    """An open session is a call in flight: a client at its --max-per-client share can open no more
    sessions (nor other calls) until one ends, and its slots come back when its sessions close."""
    server = make_server(max_per_client=2)
    slots = server.server.servicer.clients
    with NextCharClient(server.address, timeout=30) as c:
        a, b = c.session("rnn", n=1, text="O"), c.session("rnn", n=1, text="O")
        assert slots.in_flight == {"127.0.0.1": 2}
        with pytest.raises(ResourceExhausted, match="--max-per-client=2"):
            c.session("rnn", n=1)
        with pytest.raises(ResourceExhausted, match="--max-per-client=2"):
            c.generate("rnn", "O say", 3)
        a.close()
        wait_until(lambda: slots.in_flight == {"127.0.0.1": 1}, 10, "a's slot to free")
        with c.session("rnn", n=1, text="O s") as d:
            assert d.opened is not None and len(d.opened.predictions) == 1
        b.close()
    wait_until(lambda: slots.in_flight == {}, 10, "every slot to free")
    assert not _table(server).active


def test_async_session_matches_the_sync_one(server, client: NextCharClient) -> None:
    async def run() -> list:
        async with AsyncNextCharClient(server.address, timeout=30) as ac:
            session = await ac.session("gru", n=4, text="O say")
            update = await session.append(" c")
            text = "".join([t async for t in session.complete(10, seed=3, temperature=1.0)])
            await session.close()
            return [update, text]

    update, text = asyncio.run(run())
    _same(update.predictions, client.predict_next("gru", "O say c", 4))
    assert text == client.generate("gru", "O say c", 10, seed=3, temperature=1.0).text


def test_cli_type_reads_a_pipe_one_line_per_key(server, client: NextCharClient) -> None:
    import subprocess

    from server_harness import ROOT, nextchar_cmd

    keys = "O sab\x7fzy"  # a typo erased with backspace, a key outside the vocabulary, the right key
    done = subprocess.run(nextchar_cmd("type", "--server", server.address, "--model", "gru", "-n", "3"),
                          input=keys, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == [1, 2, 3, 4, 5, 4, 5]
    assert "'z'" in done.stderr and "vocabulary" in done.stderr  # reported; the session went on
    best = client.predict_next("gru", "O say", 3)
    assert lines[-1].split("\t")[1] == "  ".join(f"{p.char!r} {p.probability:.4f}" for p in best)


def test_an_oversized_append_is_refused_before_it_is_read(client: NextCharClient) -> None:
    """20,000 characters outside the vocabulary: refused for its length (a short answer), not listed one
    by one, and the session goes on."""
    with client.session("lstm", n=2, text="O sa") as session:
        with pytest.raises(ResourceExhausted, match="append") as full:
            session.append("\x01" * 20_000)
        assert len(str(full.value)) < 400
        assert session.append("y").text_chars == 5


def test_a_completion_shares_the_batchers_calls_with_a_generation(make_server) -> None:
    """A session's completion is a generation resumed from the session's state: on a model with one
    batcher it rides in the same engine calls as a GenerateStream running meanwhile, and its text is
    Generate's for the same seed."""
    server = make_server(model_instances=1, max_new_chars=20_000)
    with NextCharClient(server.address, timeout=60) as c:
        stream = c.generate_stream("lstm", "O say", 20_000, temperature=1.0, seed=1)
        first = next(iter(stream))  # the generation is running
        assert first
        with c.session("lstm", n=0, text="O say") as session:
            text = "".join(session.complete(300, temperature=0.8, seed=7))
        (batcher,) = [b for b in server.runner.batchers if b.core.engine.name == "lstm"]
        shared = dict(batcher.core.stats.batch_sizes)  # before anything else runs on it
        stream.cancel()
        assert text == c.generate("lstm", "O say", 300, temperature=0.8, seed=7).text
    assert shared.get(2, 0) > 0, shared


@pytest.mark.parametrize("leave", ["break", "raise"])
def test_a_completion_left_early_keeps_the_session_usable(client: NextCharClient, leave: str) -> None:
    """Leaving `for piece in s.complete(...)` early (break, or an exception in the loop body) drains the
    completion's remaining answers: later calls get their own answers and the text length stays right."""
    with client.session("lstm", n=3, text="O sa") as session:
        try:
            for _piece in session.complete(50, seed=5):
                if leave == "raise":
                    raise KeyError("the caller's own error")
                break
        except KeyError:
            pass
        update = session.append("y")
        assert update.text_chars == 5 and session.text_chars == 5
        _same(update.predictions, client.predict_next("lstm", "O say", 3))
        text = "".join(session.complete(20, seed=5))
        assert text == client.generate("lstm", "O say", 20, seed=5).text


def test_answers_of_a_completion_left_unread_are_skipped(client: NextCharClient) -> None:
    """A completion generator kept but not read on: the next call skips its answers (ids only grow), and
    closing the abandoned generator later does not wait for answers that will never come."""
    with client.session("lstm", n=3, text="O sa") as session:
        pieces = session.complete(50, seed=5)
        assert next(pieces)
        assert session.append("y").text_chars == 5
        assert session.predict(2)
        pieces.close()  # must not block: its answers were consumed by the append
        assert session.delete(1).text_chars == 4


def test_async_completion_left_early_keeps_the_session_usable(server, client: NextCharClient) -> None:
    async def run() -> tuple:
        async with (AsyncNextCharClient(server.address, timeout=30) as ac,
                    await ac.session("lstm", n=3, text="O sa") as session):
            async for _piece in session.complete(50, seed=5):
                break
            with pytest.raises(KeyError):
                async for _piece in session.complete(50, seed=6):
                    raise KeyError("the caller's own error")
            update = await session.append("y")
            text = "".join([t async for t in session.complete(20, seed=5)])
            return update, session.text_chars, text

    update, chars, text = asyncio.run(run())
    assert update.text_chars == 5 and chars == 5
    _same(update.predictions, client.predict_next("lstm", "O say", 3))
    assert text == client.generate("lstm", "O say", 20, seed=5).text


def test_async_call_timed_out_gives_typed_errors_not_cancelled(make_server) -> None:
    """A wait_for timeout cancels the Session call (grpc.aio): the caller sees TimeoutError, close() and
    `async with` end quietly, and later calls raise the client's Cancelled, not InvalidStateError."""
    from nextchar.client.errors import Cancelled

    server = make_server(max_new_chars=20_000)

    async def run() -> None:
        async with AsyncNextCharClient(server.address, timeout=30) as ac:
            with pytest.raises(TimeoutError):
                async with await ac.session("lstm", n=0, text="O sa") as session:
                    pieces = session.complete(20_000, seed=1)
                    await asyncio.wait_for(pieces.__anext__(), 10)  # started
                    await asyncio.wait_for(session.append("x"), 0.01)  # waits behind 20,000 chars
            with pytest.raises(Cancelled):
                await session.append("y")
            with pytest.raises(Cancelled):
                await session.predict(1)
            await session.close()
            assert not asyncio.current_task().cancelling()

    asyncio.run(run())


def test_sessions_that_failed_while_reading_leak_no_request_threads(make_server) -> None:
    """A session whose call fails while the caller waits for answers (its deadline here; a drain or the
    idle TTL alike), dropped without close(): grpc's request-reading thread must not stay blocked on the
    session's outbox."""
    import gc
    import sys

    def readers() -> int:  # threads inside grpc's request-reading loop
        def reading(frame) -> bool:
            while frame is not None:
                if frame.f_code.co_name == "consume_request_iterator":
                    return True
                frame = frame.f_back
            return False

        return sum(reading(f) for f in sys._current_frames().values())

    server = make_server(max_new_chars=20_000)
    before = readers()
    with NextCharClient(server.address, timeout=30) as c:
        for _ in range(3):
            s = c.session("lstm", n=0, text="O", timeout=0.3)
            with pytest.raises(DeadlineExceeded):
                while True:  # the deadline falls while the session reads a completion
                    for _piece in s.complete(20_000):
                        pass
            del s
        gc.collect()
        wait_until(lambda: readers() <= before, 10, f"request threads to end ({readers()} > {before})")


def test_the_typing_cli_follows_what_the_server_holds_when_it_skips_keys(server) -> None:
    """`nextchar type --oov skip`: a key the server leaves out is not in the CLI's text either, so a
    backspace after it erases what the server holds (it asked the server to delete from an empty text)."""
    import subprocess

    from server_harness import ROOT, nextchar_cmd

    keys = "z\x7fO\x01 s"  # skipped, a backspace with nothing held, a key, skipped, two keys
    done = subprocess.run(nextchar_cmd("type", "--server", server.address, "--model", "gru", "-n", "2",
                                       "--oov", "skip"),
                          input=keys, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [int(line.split("\t")[0]) for line in done.stdout.splitlines()] == [0, 1, 1, 2, 3]
    assert "nextchar type" not in done.stderr, done.stderr  # no refused delete


def test_a_sync_session_dropped_without_close_ends_its_request_thread(server) -> None:
    """grpc's request thread of a sync typing session waits on the session's queue: a session dropped
    without close() ends it once collected (it waited for good, one thread per session)."""
    import gc
    import threading

    from server_harness import wait_until

    with NextCharClient(server.address, timeout=60) as c:
        with c.session("lstm", n=1, text="O sa") as warm:  # grpc starts threads of its own at the first
            warm.append("y")
        before = threading.active_count()
        for _ in range(3):
            c.session("lstm", n=1, text="O sa").append("y")  # never closed
        gc.collect()
        wait_until(lambda: threading.active_count() <= before, 10, "the dropped sessions' threads to end")
