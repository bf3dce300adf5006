"""server.runner with a numpy fake engine: coalescing rules, admission, draining, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from fake_engine import FakeEngine
from philox_ref import per_step_generate

from nextchar.server.core.generation import FinishReason, GenerationRequest
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.scheduling.channel import Channel
from nextchar.server.scheduling.runner import (
    DeadlineError,
    Outcome,
    OverloadedError,
    Runner,
    ShuttingDownError,
)


def _request(n: int = 50, seed: int = 3) -> GenerationRequest:
    return GenerationRequest("abc", n, SamplingParams(temperature=1.0), seed=seed)


def _expected(engine: FakeEngine, request: GenerationRequest) -> str:
    return per_step_generate(engine, request)[0]


def test_channel_wakes_at_the_first_char_when_asked_for_one() -> None:
    async def main() -> tuple[str, object]:
        channel = Channel(asyncio.get_running_loop())
        threading.Thread(target=channel.put, args=("x",)).start()
        return await channel.take(1, None)

    assert asyncio.run(main()) == ("x", None)


def test_channel_waits_for_enough_chars_then_takes_them_all() -> None:
    async def main() -> list[str]:
        channel = Channel(asyncio.get_running_loop())

        def produce() -> None:
            for ch in "abcdefgh":
                channel.put(ch)

        threading.Thread(target=produce).start()
        pieces = []
        while sum(map(len, pieces)) < 8:
            text, end = await channel.take(5 if not pieces else 1, None)
            assert end is None
            pieces.append(text)
        return pieces

    pieces = asyncio.run(main())
    assert "".join(pieces) == "abcdefgh" and len(pieces[0]) >= 5


def test_channel_flushes_what_it_has_when_the_wait_expires() -> None:
    async def main() -> tuple[str, object]:
        channel = Channel(asyncio.get_running_loop())
        channel.put("ab")
        return await channel.take(1000, 0.001)  # never 1000 chars: the timer releases the two

    assert asyncio.run(main()) == ("ab", None)


def test_channel_returns_at_once_on_the_end() -> None:
    async def main() -> tuple[str, object]:
        channel = Channel(asyncio.get_running_loop())
        channel.put("ab")
        channel.close(KeyError("boom"))
        return await channel.take(1000, None)

    text, end = asyncio.run(main())
    assert text == "ab" and isinstance(end, KeyError)


@pytest.mark.parametrize("flush_chars", [1, 7, 1000])
def test_generate_streams_the_same_text_as_the_core(flush_chars: int) -> None:
    engine, request = FakeEngine(), _request(200)

    async def main() -> list:
        runner = Runner(2, flush_s=0.001, flush_chars=flush_chars)
        try:
            return [item async for item in runner.generate(engine, request)]
        finally:
            runner.close()

    items = asyncio.run(main())
    *texts, outcome = items
    assert "".join(texts) == _expected(FakeEngine(), request)
    assert isinstance(outcome, Outcome) and outcome.finished.reason is FinishReason.LENGTH
    assert outcome.finished.usage.generated_chars == 200 and outcome.queued_s >= 0


class _GatedEngine(FakeEngine):
    """FakeEngine that holds its step after `free_steps` calls until `gate` is set (bounded wait), so
    a test can act while a generation is certainly still running, however slow the machine."""

    def __init__(self, free_steps: int) -> None:
        super().__init__()
        self.free_steps, self.gate = free_steps, threading.Event()

    def step(self, tokens, state):
        if len(self.calls) >= self.free_steps:
            assert self.gate.wait(10.0), "gate never opened"
        return super().step(tokens, state)


def test_admission_limit_draining_and_tracks() -> None:
    engine = _GatedEngine(free_steps=20)

    async def main() -> None:
        runner = Runner(1, flush_s=0.001, flush_chars=8)
        tracks: list = []
        runner.observers.append(tracks.append)
        try:
            stream = runner.generate(engine, _request(10_000))
            first = await stream.__anext__()
            assert first
            with pytest.raises(OverloadedError, match="max_concurrent=1"):
                await runner.call(len, "x")
            await stream.aclose()  # the caller leaving: the worker stops
            engine.gate.set()  # the worker, held mid-generation, sees the stop at its next step
            assert runner.cancelled_streams == 1
            assert await runner.call(len, "xy") == 2
            assert await runner.drain(1.0) is True
            with pytest.raises(ShuttingDownError):
                await runner.call(len, "x")
            track = tracks[-1]
            for _ in range(1000):
                if track.finished_at is not None:
                    break
                await asyncio.sleep(0.005)
            assert track.reason is FinishReason.CANCELLED and track.steps <= 21
        finally:
            runner.close()

    asyncio.run(main())


def test_a_passed_deadline_is_deadline_error() -> None:
    async def main() -> None:
        runner = Runner(1, flush_s=0.001, flush_chars=8)
        tracks: list = []
        runner.observers.append(tracks.append)
        try:
            with pytest.raises(DeadlineError, match=r"deadline of 0\.000s passed"):
                async for _ in runner.generate(FakeEngine(), _request(100_000), deadline_s=0.0):
                    pass
            assert tracks[-1].reason is FinishReason.DEADLINE
        finally:
            runner.close()

    asyncio.run(main())


def test_request_errors_surface_to_the_caller() -> None:
    async def main() -> None:
        runner = Runner(1, flush_s=0.001, flush_chars=8)
        tracks: list = []
        runner.observers.append(tracks.append)
        try:
            request = GenerationRequest("abc#", 5)
            with pytest.raises(ValueError, match="prompt: 1 character"):
                async for _ in runner.generate(FakeEngine(), request):
                    pass
            assert runner.in_flight == 0
        finally:
            runner.close()

    asyncio.run(main())


def test_a_unary_call_gets_the_text_in_one_piece() -> None:
    engine, request = FakeEngine(), _request(300)

    async def main() -> list:
        runner = Runner(1, flush_s=0.0001, flush_chars=1)
        try:
            return [item async for item in runner.generate(engine, request, live=False)]
        finally:
            runner.close()

    text, outcome = asyncio.run(main())
    assert text == _expected(FakeEngine(), request) and isinstance(outcome, Outcome)


def _batched_runner(**config) -> Runner:
    from nextchar.server.scheduling.policy import BatchingConfig

    return Runner(8, flush_s=0.001, flush_chars=8, batching=BatchingConfig(**config), instances=2)


def test_a_batcher_lane_that_died_is_replaced_not_chosen() -> None:
    """A lane whose worker died (a bug in a tick: it fails its streams and stops) reports no load, so
    the least-loaded choice sent every new stream to it: UNAVAILABLE for the model version until a
    reload. A dead lane is now replaced by a fresh one."""
    engine, request = FakeEngine(), _request(20)

    async def main() -> None:
        runner = _batched_runner(max_wait_s=0.0)
        try:
            assert len([item async for item in runner.generate(engine, request)]) > 1  # lanes start
            dead = runner.batchers[1]

            def broken(now):
                raise RuntimeError("a bug in a tick")
            dead.core.tick = broken
            dead.wake()
            for _ in range(1000):
                if dead.core.closed is not None:
                    break
                await asyncio.sleep(0.005)
            assert dead.core.closed is not None
            runner.batchers[0].core.counts = lambda: (5, 0)  # the healthy lane is busy
            for seed in range(4):  # each new stream is served (it went to the dead lane: UNAVAILABLE)
                items = [item async for item in runner.generate(engine, _request(20, seed))]
                assert isinstance(items[-1], Outcome)
            assert dead not in runner.batchers
        finally:
            runner.close()

    asyncio.run(main())


def test_a_cancelled_stream_leaves_its_batchers_queue_at_once() -> None:
    """A queued stream whose caller leaves frees its place in the queue at once (the batcher is woken);
    it used to hold it until the worker's next timed wake-up (up to max_wait_s, here 10 s)."""
    engine = FakeEngine()

    async def main() -> None:
        from nextchar.server.scheduling.policy import BatchingConfig

        runner = Runner(8, flush_s=0.001, flush_chars=8, instances=1,
                        batching=BatchingConfig(max_wait_s=10.0, max_batch_size=4))
        try:
            stream = runner.generate(engine, _request(20))
            task = asyncio.ensure_future(stream.__anext__())  # submitted: waits 10 s for company
            await asyncio.sleep(0.05)
            (batcher,) = runner.batchers
            assert batcher.core.counts() == (0, 1)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await stream.aclose()
            for _ in range(200):
                if batcher.core.counts() == (0, 0):
                    break
                await asyncio.sleep(0.005)
            assert batcher.core.counts() == (0, 0)
        finally:
            runner.close()

    asyncio.run(main())


def test_drain_called_twice_waits_for_the_same_calls() -> None:
    engine = _GatedEngine(free_steps=3)

    async def main() -> None:
        runner = Runner(2, flush_s=0.001, flush_chars=1)
        try:
            stream = runner.generate(engine, _request(50))
            assert await stream.__anext__()
            first = asyncio.ensure_future(runner.drain(5.0))
            second = asyncio.ensure_future(runner.drain(5.0))
            await asyncio.sleep(0.02)
            engine.gate.set()
            async for _ in stream:
                pass
            assert await first is True and await second is True
        finally:
            runner.close()

    asyncio.run(main())


def test_a_cancelled_call_keeps_its_slot_until_its_thread_ends() -> None:
    """A worker thread cannot be stopped: a call cancelled (deadline, disconnect) while its function runs
    holds its slot, and so the caller's own limits released as it unwinds, until the function returns;
    else a caller could run any number of computations past --max-concurrent and keep drain waiting for
    nothing. One not started yet never runs."""
    runner = Runner(max_concurrent=2, flush_s=0.005, flush_chars=64)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def work(name: str) -> str:
        ran.append(name)
        started.set()
        release.wait(10)
        return name

    async def main() -> None:
        task = asyncio.create_task(runner.call(work, "a"))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and runner.in_flight == 1  # its thread still runs
        assert not await runner.drain(0.05)  # so a drain is not over
        runner.draining = False
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.in_flight == 0

    asyncio.run(main())
    assert ran == ["a"]
    runner.close()

    # Queued behind a busy pool, cancelled before it started: it never runs, and frees its slot at once.
    runner = Runner(max_concurrent=2, flush_s=0.005, flush_chars=64)
    runner._executor._max_workers = 1  # one worker, held by the first call
    started.clear()
    release.clear()
    ran.clear()

    async def queued() -> None:
        first = asyncio.create_task(runner.call(work, "first"))
        await asyncio.to_thread(started.wait, 10)
        second = asyncio.create_task(runner.call(work, "second"))
        await asyncio.sleep(0.05)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert runner.in_flight == 1
        release.set()
        assert await first == "first"

    asyncio.run(queued())
    assert ran == ["first"]
    runner.close()


def test_a_cancelled_calls_later_error_is_not_logged_as_lost(caplog: pytest.LogCaptureFixture) -> None:
    """The error of a call whose caller left (its thread raised after the cancel) is nobody's to read:
    asyncio must not log it as 'Future exception was never retrieved'."""
    import gc

    runner = Runner(max_concurrent=2, flush_s=0.005, flush_chars=64)
    started, release = threading.Event(), threading.Event()

    def fails() -> None:
        started.set()
        release.wait(10)
        raise ValueError("the load failed after its caller left")

    async def main() -> None:
        task = asyncio.create_task(runner.call(fails))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    runner.close()
    assert "never retrieved" not in caplog.text
