"""Backpressure of the batching server: per-model stream and queue limits, queued deadlines, queued cancels.

Fills the gaps left by tests/unit/test_batching.py (the core's limits on a fake engine) and
test_server_errors.py (the runner's max_concurrent): here the batcher's limits are reached through
gRPC on a real server, and what happens to a queued request is observed through server-side counters
(the batcher's queue length and prefill count, the runner's cancelled-stream count, and the
generations' tracks through its observers).
"""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from server_harness import wait_until

from nextchar.client.client import NextCharClient
from nextchar.client.errors import DeadlineExceeded, ResourceExhausted
from nextchar.server.core.generation import FinishReason, GenerationRequest
from nextchar.server.scheduling.runner import DeadlineError

PROMPT = "O say can you see"
LONG = 100_000  # a generation that runs until the test cancels it
# Poll a server-side condition (no log reading), bounded.
server_side = functools.partial(wait_until, timeout=10.0, what="a server-side condition", interval=0.002)


class _Cores:
    """The batching cores serving one model (the runner starts --model-instances of them per model
    version on first use), read as one."""

    def __init__(self, server, name: str) -> None:
        self.server, self.name = server, name

    @property
    def cores(self) -> list:
        return [b.core for b in self.server.runner.batchers if b.core.engine.artifact.name == self.name]

    @property
    def pending(self) -> int:
        return sum(c.pending for c in self.cores)

    @property
    def active(self) -> list:
        return [s for c in self.cores for s in c.active]

    @property
    def prefill_calls(self) -> int:
        return sum(c.stats.prefill_calls for c in self.cores)


def core_of(server, name: str) -> _Cores:
    """The batching cores serving model `name`, once started."""
    server_side(lambda: any(b.core.engine.artifact.name == name for b in server.runner.batchers))
    return _Cores(server, name)


def start_running(client: NextCharClient, n: int, name: str = "rnn") -> list:
    """n long streams that have produced their first text (so they hold active slots)."""
    streams = [client.generate_stream(name, PROMPT, LONG, temperature=1.0, seed=i) for i in range(n)]
    for s in streams:
        assert next(iter(s))
    return streams


@pytest.fixture(scope="module")
def small(make_server):
    """Batching on, 2 active streams and 1 queued per model over 2 batchers (the limits hold for the
    model, not per batcher); max_concurrent well above both."""
    return make_server(batching="on", max_active_streams=2, max_queue=1, max_new_chars=LONG,
                       max_concurrent=64, grace_seconds=1.0, model_instances=2)


def test_past_active_and_queue_limits_resource_exhausted_at_once_naming_the_limit(small) -> None:
    with NextCharClient(small.address, timeout=60) as c:
        running = start_running(c, 2)
        core = core_of(small, "rnn")
        queued = c.generate_stream("rnn", PROMPT, 7)
        server_side(lambda: core.pending == 1)
        with pytest.raises(ResourceExhausted, match=r"max_queue=1") as refused:
            c.generate("rnn", PROMPT, 5)
        assert "max_active_streams=2" in refused.value.details
        # Refused at once: both long streams are still decoding and the queued one still waits.
        assert len(core.active) == 2 and core.pending == 1
        # The limits are per model: another model serves normally meanwhile.
        assert c.generate("gru", PROMPT, 5).summary.generated_chars == 5
        for s in running:
            s.cancel()
        assert len("".join(queued)) == 7  # the queued request gets its slot and full service
        assert queued.summary.generated_chars == 7


@pytest.mark.parametrize("instances", [1, 2])
def test_without_a_queue_the_active_limit_is_named(make_server, instances: int) -> None:
    s = make_server(batching="on", max_active_streams=1, max_queue=0, max_new_chars=LONG, max_concurrent=64,
                    model_instances=instances)
    with NextCharClient(s.address, timeout=60) as c:
        running = start_running(c, 1)
        with pytest.raises(ResourceExhausted, match=r"max_active_streams=1"):
            c.generate("rnn", PROMPT, 5)
        core = core_of(s, "rnn")
        # The first char leaves during the prefill call, before the stream joins core.active: wait
        # for it to join, or "not core.active" below could hold before the cancel was even seen.
        server_side(lambda: core.active)
        running[0].cancel()
        server_side(lambda: not core.active)
        assert c.generate("rnn", PROMPT, 5).summary.generated_chars == 5


def test_time_spent_queued_counts_against_the_deadline(small) -> None:
    runner = small.runner
    with NextCharClient(small.address, timeout=60) as c:
        running = start_running(c, 2)
        core = core_of(small, "rnn")
        prefills = core.prefill_calls
        # Through gRPC: the queued call fails at its deadline and leaves the queue while the slots
        # stay busy, so its queue place is free again before any stream finished.
        with pytest.raises(DeadlineExceeded):
            c.generate("rnn", PROMPT, 5, timeout=0.3)
        server_side(lambda: core.pending == 0)
        assert len(core.active) == 2
        # The same through the runner itself (no gRPC deadline racing the server's): DeadlineError
        # after 0 generated chars, the track says DEADLINE, and nothing was prefilled for it.
        engine = small.server.servicer.registry.get("rnn").engine

        async def queued_call() -> None:
            async for _ in runner.generate(engine, GenerationRequest(PROMPT, 5), deadline_s=0.3):
                pass

        t0 = time.perf_counter()
        with pytest.raises(DeadlineError, match=r"after 0 of max_new_chars=5"):
            small.run(queued_call())
        track = small.tracks[-1]
        assert track.reason is FinishReason.DEADLINE and track.max_new_chars == 5
        assert track.finished_at - track.started_at >= 0.3 - 1e-3 and time.perf_counter() - t0 >= 0.3
        assert core.prefill_calls == prefills and len(core.active) == 2
        for s in running:
            s.cancel()
        server_side(lambda: not core.active)  # a cancel is seen between engine calls (K chars each)


def test_a_cancelled_queued_request_never_runs(small) -> None:
    runner = small.runner
    with NextCharClient(small.address, timeout=60) as c:
        running = start_running(c, 2)
        core = core_of(small, "rnn")
        prefills = core.prefill_calls
        cancelled = runner.cancelled_streams
        queued = c.generate_stream("rnn", PROMPT, 50)
        server_side(lambda: core.pending == 1)
        track = small.tracks[-1]
        queued.cancel()
        server_side(lambda: runner.cancelled_streams == cancelled + 1 and core.pending == 0)
        for s in running:
            s.cancel()
        server_side(lambda: not core.active)
        server_side(lambda: track.finished_at is not None)
    assert track.reason is FinishReason.CANCELLED
    # A stream joins decoding only after its prefill, so no new prefill means it never ran.
    assert core.prefill_calls == prefills


def test_async_burst_over_the_queue_limit(small) -> None:
    """Many calls at once: exactly the excess is refused, naming the limit; the rest get full service."""
    from nextchar.client.client import AsyncNextCharClient

    async def main() -> list:
        async with AsyncNextCharClient(small.address, timeout=60) as c:
            return await asyncio.gather(*(c.generate("lstm", PROMPT, 2000, temperature=1.0, seed=i)
                                          for i in range(6)), return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    served = [r for r in results if not isinstance(r, BaseException)]
    # 2 active + 1 queued fit; the 2,000-char generations outlast the burst's arrival by far.
    assert len(refused) == 3 and len(served) == 3, results
    assert all("max_queue=1" in r.details for r in refused)
    assert all(r.summary.generated_chars == 2000 for r in served)
