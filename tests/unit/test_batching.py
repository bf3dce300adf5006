"""The continuous batcher: the collector, join/leave/cancel/errors on a fake clock, real-model equality."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
from fake_engine import FakeEngine, ScriptedEngine
from philox_ref import per_step_generate

from nextchar.server.core.generation import Finished, FinishReason, GenerationRequest, TextChunk
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.scheduling.batcher import Batcher
from nextchar.server.scheduling.batching import BatchCore, BatcherClosedError, CapacityError
from nextchar.server.scheduling.policy import (
    BatchingConfig,
    BatchingConfigError,
    admit_count,
    chars_per_call,
    prefill_groups,
)

GREEDY = SamplingParams(temperature=0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """Collects one stream's callbacks."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.end: Finished | BaseException | None = None

    def text(self, t: str) -> None:
        assert self.end is None
        self.texts.append(t)

    def finish(self, end) -> None:
        assert self.end is None
        self.end = end


def make_core(engine, clock=None, **config) -> BatchCore:
    """A core on a fake clock; one char per engine call unless told (the schedule tests count calls)."""
    config.setdefault("max_wait_s", 0.0)
    config.setdefault("max_chars_per_call", 1)
    return BatchCore(engine, BatchingConfig(**config), clock=clock or Clock())


def submit(core: BatchCore, prompt: str = "ab", n: int = 5, cancelled=None, **kw) -> Sink:
    sink = Sink()
    kw.setdefault("sampling", GREEDY)
    core.submit(GenerationRequest(prompt, n, **kw), on_text=sink.text, on_end=sink.finish,
                cancelled=cancelled)
    return sink


def drain(core: BatchCore, clock: Clock | None = None, limit: int = 1000) -> None:
    for _ in range(limit):
        if core.tick(clock() if clock else 0.0) is None:
            return
    raise AssertionError("the batcher did not go idle")


# The collector and the grouping, as pure functions.

def test_admit_flushes_on_size_time_or_running_loop():
    c = BatchingConfig(max_batch_size=3, max_wait_s=1.0, max_active_streams=10)
    assert admit_count([], 0, 0.0, c) == (0, None)
    assert admit_count([0.0, 0.1], 0, 0.5, c) == (0, 0.5)     # idle: wait for company
    assert admit_count([0.0, 0.1], 0, 1.0, c) == (2, None)    # the oldest waited max_wait_s
    assert admit_count([0.0, 0.1, 0.2], 0, 0.3, c) == (3, None)  # a full batch is waiting
    assert admit_count([0.4], 2, 0.4, c) == (1, None)         # streams running: join at once


def test_admit_respects_free_slots():
    c = BatchingConfig(max_batch_size=8, max_wait_s=1.0, max_active_streams=4)
    assert admit_count([0.0] * 5, 4, 9.0, c) == (0, None)
    assert admit_count([0.0] * 5, 3, 0.0, c) == (1, None)
    assert admit_count([0.0, 0.0], 2, 0.0, c) == (2, None)


def test_a_burst_is_admitted_once_it_pauses_a_lone_arrival_at_once():
    c = BatchingConfig(max_batch_size=8, max_active_streams=100, burst_gap_s=0.003, max_call_s=0.03)
    assert admit_count([0.0], 0, 0.0, c) == (1, None)                        # lone: at once
    assert admit_count([0.0], 1, 0.0, c, previous=-1.0) == (1, None)         # the one before is long gone
    n, wait = admit_count([0.001], 1, 0.001, c, previous=0.0)                # 1 ms after the one before:
    assert n == 0 and wait == pytest.approx(0.003)                           # a burst, held
    n, wait = admit_count([0.001, 0.002], 1, 0.004, c, previous=0.0)         # still coming 2 ms ago
    assert n == 0 and wait == pytest.approx(0.001)
    assert admit_count([0.001, 0.002], 1, 0.005, c, previous=0.0) == (2, None)  # paused 3 ms: all in
    steady = [i * 0.001 for i in range(1, 8)]                                # never pausing:
    assert admit_count(steady, 1, 0.031, c, previous=0.0) == (7, None)       # the oldest waited max_call_s
    assert admit_count([i * 1e-4 for i in range(8)], 0, 0.0008, c) == (8, None)  # a full batch: at once
    off = BatchingConfig(max_batch_size=8, max_active_streams=100)           # burst_gap_s 0: off
    assert admit_count([0.001], 1, 0.001, off, previous=0.0) == (1, None)


def test_k_is_one_while_arrivals_wait_then_doubles_within_its_bounds():
    c = BatchingConfig(max_chars_per_call=64, max_call_s=0.03)

    def k(previous=8, waiting=False, remaining=1000, spc=0.0, deadline=None):
        return chars_per_call(previous, arrivals_waiting=waiting, remaining=remaining, seconds_per_char=spc,
                              until_deadline_s=deadline, config=c)

    assert k(waiting=True) == 1                      # their prefill is next: keep this call short
    assert [k(p) for p in (1, 2, 16, 32, 64)] == [2, 4, 32, 64, 64]
    assert k(remaining=5) == 5                       # no chars beyond what the rows still want
    assert k(spc=0.001) == 16                        # 30 ms / 1 ms per char
    assert k(spc=0.001, deadline=0.004) == 4         # a near deadline is checked between calls
    assert k(spc=1.0) == 1 and k(remaining=0) == 1   # never below one char


def test_prefill_groups_by_equal_length_in_arrival_order():
    assert prefill_groups([2, 3, 2, 2, 3], 8) == [[0, 2, 3], [1, 4]]
    assert prefill_groups([5, 5, 5], 2) == [[0, 1], [2]]
    assert prefill_groups([], 4) == []


@pytest.mark.parametrize("kw", [{"max_batch_size": 0}, {"max_wait_s": -1}, {"max_queue": -1},
                                {"max_active_streams": 0}, {"burst_gap_s": -0.001}])
def test_config_is_validated(kw):
    with pytest.raises(BatchingConfigError, match=next(iter(kw))):
        BatchingConfig(**kw)


# The core, on a fake clock.

def test_flush_on_time():
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock, max_wait_s=1.0, max_batch_size=4)
    submit(core)
    assert core.tick(0.0) == pytest.approx(1.0) and engine.calls == []
    clock.now = 0.5
    submit(core)
    assert core.tick(0.5) == pytest.approx(0.5) and engine.calls == []
    assert core.tick(1.0) == 0.0
    assert engine.calls[:2] == [(2, 2), (2, 1)]  # one prefill for both, then one decode step for both


def test_flush_on_size():
    engine = FakeEngine()
    core = make_core(engine, max_wait_s=5.0, max_batch_size=3)
    for _ in range(3):
        submit(core)
    core.tick(0.0)
    assert engine.calls[0] == (3, 2)


def test_join_and_leave_between_steps():
    engine = FakeEngine()
    core = make_core(engine)
    a = submit(core, "abc", 3)
    core.tick(0.0)
    b = submit(core, "ab", 4)
    drain(core)
    # tick 1: a's prefill (1st char) + a decode (2nd); tick 2: b's prefill, then a (3rd, leaves) and b
    # share one decode call; ticks 3 and 4: b alone.
    assert engine.calls == [(1, 3), (1, 1), (1, 2), (2, 1), (1, 1), (1, 1)]
    assert a.end.reason is FinishReason.LENGTH and b.end.reason is FinishReason.LENGTH
    assert len("".join(a.texts)) == 3 and len("".join(b.texts)) == 4


def test_decode_batches_are_capped_and_prefills_grouped_by_length():
    engine = FakeEngine()
    core = make_core(engine, max_batch_size=2)
    sinks = [submit(core, p, 3) for p in ("ab", "abc", "ba", "cab", "bb")]
    drain(core)
    assert engine.calls[:3] == [(2, 2), (2, 3), (1, 2)]  # lengths 2,2 | 3,3 | 2 (groups in arrival order)
    assert engine.calls[3:6] == [(2, 1), (2, 1), (1, 1)]
    assert all(isinstance(s.end, Finished) and len("".join(s.texts)) == 3 for s in sinks)


def test_arrivals_prefills_yield_to_streams_already_decoding_after_about_one_call():
    """Three arrivals of different lengths while a stream decodes: with each engine call taking 0.05 s
    (more than max_call_s), one prefill group runs per tick and the decoding stream advances in every
    tick, instead of waiting for all three prefills; nobody is lost or reordered."""
    clock = Clock()
    engine = FakeEngine()
    step = engine.step

    def slow_step(tokens, state):
        clock.now += 0.05
        return step(tokens, state)

    engine.step = slow_step
    core = make_core(engine, clock=clock, max_call_s=0.03)
    first = submit(core, "ab", 20)
    core.tick(clock())  # its prefill, then its first decode call
    chars = len("".join(first.texts))
    late = [submit(core, p, 3) for p in ("abc", "abcd", "abcde")]
    core.tick(clock())
    assert sum(s.texts != [] for s in late) == 1 and len(core.waiting) == 2
    assert len("".join(first.texts)) == chars + 1  # it advanced in the same tick
    core.tick(clock())
    assert sum(s.texts != [] for s in late) == 2 and len("".join(first.texts)) == chars + 2
    drain(core, clock)
    assert all(isinstance(s.end, Finished) for s in (first, *late))
    assert [len("".join(s.texts)) for s in late] == [3, 3, 3]


def test_a_burst_prefills_together_while_the_first_arrival_goes_on():
    """The first of a burst starts at once; the rest, arriving 0.5 ms apart, are held (the first keeps
    decoding) until arrivals pause for burst_gap_s, then prefill in one call and decode with it."""
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock=clock, burst_gap_s=0.003, max_call_s=0.03, max_batch_size=8)
    first = submit(core, "ab", 50)
    core.tick(clock())
    assert engine.calls[:1] == [(1, 2)] and first.texts  # at once: its prefill (first char), a decode
    rest = []
    for _ in range(5):
        clock.now += 0.0005
        rest.append(submit(core, "ba", 5))
        core.tick(clock())
    assert all(not s.texts for s in rest) and len(core.waiting) == 5  # held while they keep coming
    assert len("".join(first.texts)) > 1                               # the first went on meanwhile
    calls = len(engine.calls)
    clock.now += 0.004  # a pause longer than burst_gap_s
    core.tick(clock())
    assert engine.calls[calls] == (5, 2)  # one prefill for the five
    drain(core, clock)
    assert all(isinstance(s.end, Finished) and len("".join(s.texts)) == 5 for s in rest)


def test_a_stream_resumed_from_a_state_equals_one_reading_its_prompt_and_shares_calls():
    """submit(start=(state, logits)): no prefill call; the first char comes from the given logits, then
    the stream decodes in the same calls as the others, with the text of a stream that read the prompt."""
    sampling = SamplingParams(1.5, top_k=6)

    def texts(resume: bool) -> tuple[list[str], list[tuple[int, int]]]:
        engine = FakeEngine()
        core = make_core(engine, max_chars_per_call=4)
        other = submit(core, "ba", 12, sampling=sampling, seed=5)
        start = None
        if resume:
            ids = np.array([[engine.vocab_index[c] for c in "abca"]], np.int64)
            logits, state = FakeEngine().step(ids, engine.initial_state(1))  # same weights, not counted
            start = (state, logits[0, -1])
        sink = Sink()
        core.submit(GenerationRequest("abca", 12, sampling, seed=9), on_text=sink.text, on_end=sink.finish,
                    start=start)
        drain(core)
        assert isinstance(sink.end, Finished) and sink.end.usage.generated_chars == 12
        return ["".join(other.texts), "".join(sink.texts)], engine.calls

    read, read_calls = texts(False)
    resumed, resumed_calls = texts(True)
    assert resumed == read
    assert (1, 4) not in resumed_calls and (1, 4) in read_calls  # the prompt was never read
    assert (2, 1) in resumed_calls  # decode calls carry both streams


def test_a_resumed_stream_never_waits_for_company_and_a_bad_start_fails_only_its_request():
    """A resumed stream needs no prefill: even with max_wait_s and a burst hold it goes in at the next
    tick. A start whose shapes do not fit the engine is refused at submit; the core goes on."""
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock=clock, max_wait_s=1.0, burst_gap_s=0.003, max_call_s=0.03)
    ids = np.array([[engine.vocab_index[c] for c in "abca"]], np.int64)
    logits, state = FakeEngine().step(ids, engine.initial_state(1))
    with pytest.raises(ValueError, match="start must be a state"):
        core.submit(GenerationRequest("abca", 5, GREEDY), on_text=lambda t: None, on_end=lambda e: None,
                    start=(state, logits[0]))  # logits[0] is [T, V], not [V]
    sink = Sink()
    core.submit(GenerationRequest("abca", 5, GREEDY), on_text=sink.text, on_end=sink.finish,
                start=(state, logits[0, -1]))
    core.tick(clock())  # at once: no wait for company
    assert sink.texts and not core.waiting
    drain(core, clock)
    assert isinstance(sink.end, Finished) and len("".join(sink.texts)) == 5


def _resumed(core: BatchCore, engine, n: int, prompt: str = "abca") -> Sink:
    """A stream resumed from the state after `prompt` (submit's start), n chars greedy."""
    ids = np.array([[engine.vocab_index[c] for c in prompt]], np.int64)
    logits, state = FakeEngine().step(ids, engine.initial_state(1))  # same weights, not counted
    sink = Sink()
    core.submit(GenerationRequest(prompt, n, GREEDY), on_text=sink.text, on_end=sink.finish,
                start=(state, logits[0, -1]))
    return sink


def test_resumed_streams_that_end_on_their_first_char_free_their_slot_for_the_next():
    """At the stream limit, a resumed stream that ends at once (max_new_chars 1) frees its slot in the
    same tick; the next resumed one takes it. (It used to reach the plain-arrival path, trip an
    assertion and fail every stream of the batcher for good.)"""
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock=clock, max_active_streams=1)
    sinks = [_resumed(core, engine, 1) for _ in range(3)] + [_resumed(core, engine, 4)]
    core.tick(clock())
    assert [isinstance(s.end, Finished) for s in sinks] == [True, True, True, False]
    drain(core, clock)
    assert all(isinstance(s.end, Finished) for s in sinks)
    assert [s.end.usage.generated_chars for s in sinks] == [1, 1, 1, 4]
    assert core.closed is None


def test_free_slots_go_in_arrival_order_to_plain_and_resumed_streams():
    """At the stream limit a resumed stream does not jump ahead of an older queued arrival: slots are
    handed out in arrival order (a resumed one still needs no prefill and goes in at once when its
    turn comes)."""
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock=clock, max_active_streams=1)
    first = submit(core, "ab", 3)
    core.tick(clock())  # first holds the only slot
    queued = submit(core, "ab", 3)
    clock.now += 0.001
    resumed = _resumed(core, engine, 3)
    order: list[str] = []
    for _ in range(20):
        core.tick(clock())
        for name, sink in (("first", first), ("queued", queued), ("resumed", resumed)):
            if sink.texts and name not in order:
                order.append(name)
        if resumed.end is not None:
            break
    assert order == ["first", "queued", "resumed"]
    assert all(isinstance(s.end, Finished) for s in (first, queued, resumed))


def test_k_grows_while_queued_arrivals_cannot_be_admitted():
    """K drops to 1 while arrivals wait, so their prefill comes soon; but at the stream limit they cannot
    go in before a stream ends, and every call used to stay at K = 1 (the most costly per char exactly
    when the batcher is saturated)."""
    clock, engine = Clock(), FakeEngine()
    core = make_core(engine, clock=clock, max_active_streams=2, max_chars_per_call=16)
    running = [submit(core, "ab", 200), submit(core, "ab", 200)]
    core.tick(clock())
    queued = submit(core, "ab", 5)
    ks = []
    for _ in range(6):
        core.tick(clock())
        ks.append(core.k)
    assert ks[-1] == 16, ks
    drain(core, clock)
    assert all(isinstance(s.end, Finished) for s in (*running, queued))


def test_a_failing_on_text_ends_the_stream_with_its_error():
    """on_end is called exactly once whatever happens: a consumer whose on_text raises gets that
    error as its end (it used to get no end at all, and would have waited forever)."""
    core = make_core(FakeEngine())
    ends: list = []

    def broken(text: str) -> None:
        raise RuntimeError("consumer gone")

    core.submit(GenerationRequest("ab", 5, GREEDY), on_text=broken, on_end=ends.append)
    other = submit(core, "ab", 5)
    drain(core)
    assert len(ends) == 1 and isinstance(ends[0], RuntimeError)
    assert isinstance(other.end, Finished)


def test_batched_text_equals_unbatched_on_the_fake_model():
    # The fake model is plain numpy; its rows do not depend on batch mates beyond float rounding,
    # and each row draws its own uniforms (seed, char index).
    reqs = [GenerationRequest(p, 30, SamplingParams(0.8, top_k=4), seed=s)
            for p, s in (("ab", 1), ("ba", 2), ("abc", 3), ("ab", 4))]
    alone = [per_step_generate(FakeEngine(), r)[0] for r in reqs]
    core = make_core(FakeEngine(), max_chars_per_call=8)
    sinks = []
    for r in reqs:
        sink = Sink()
        core.submit(r, on_text=sink.text, on_end=sink.finish)
        sinks.append(sink)
    drain(core)
    assert ["".join(s.texts) for s in sinks] == alone


def test_cancel_leaves_between_steps_others_go_on():
    engine = FakeEngine()
    core = make_core(engine)
    flag = {"a": False}
    a = submit(core, n=50, cancelled=lambda: flag["a"])
    b = submit(core, n=6)
    core.tick(0.0)  # prefill + one decode step: two chars each
    flag["a"] = True
    drain(core)
    assert a.end.reason is FinishReason.CANCELLED and a.end.usage.generated_chars == 2
    assert b.end.reason is FinishReason.LENGTH and len("".join(b.texts)) == 6
    assert engine.calls[-1] == (1, 1)


def test_cancel_while_waiting_for_a_slot():
    core = make_core(FakeEngine(), max_active_streams=1)
    a = submit(core, n=4)
    b = submit(core, n=4, cancelled=lambda: True)
    drain(core)
    assert a.end.reason is FinishReason.LENGTH
    assert b.end.reason is FinishReason.CANCELLED and b.texts == []


class FailingEngine(FakeEngine):
    def __init__(self, fail_calls: set[int]) -> None:
        super().__init__()
        self.fail_calls = fail_calls

    def step(self, tokens, state):
        if len(self.calls) in self.fail_calls:
            self.calls.append(tokens.shape)
            raise RuntimeError("boom")
        return super().step(tokens, state)


def test_an_engine_error_fails_only_that_calls_streams():
    engine = FailingEngine(fail_calls={3})  # calls: prefill, decode [0,1], decode [2,3] (fails), ...
    core = make_core(engine, max_batch_size=2)
    sinks = [submit(core, "ab", 5, seed=i) for i in range(4)]
    drain(core)
    assert [type(s.end).__name__ for s in sinks] == ["Finished", "Finished", "RuntimeError", "RuntimeError"]
    assert all(len("".join(s.texts)) == 5 for s in sinks[:2])
    assert core.stats.failed_calls == 1


def test_a_failing_prefill_fails_its_group_only():
    engine = FailingEngine(fail_calls={0})
    core = make_core(engine)
    bad = [submit(core, "ab"), submit(core, "ba")]
    good = submit(core, "abc")
    drain(core)
    assert all(isinstance(s.end, RuntimeError) for s in bad)
    assert good.end.reason is FinishReason.LENGTH


@pytest.mark.parametrize("k", [1, 64])
def test_stop_sequences_and_echo_in_a_batch(k):
    core = make_core(ScriptedEngine("xyzSTOPabc" * 3), max_chars_per_call=k)
    a = submit(core, "ab", 20, stop=("TOP",), echo=True)
    drain(core)
    # ScriptedEngine advances its script per step, shared by the batch: prefill x, then y z S T O P.
    # With K=64 the stop lies inside one chunk: it is cut there, nothing of it or after it is sent.
    assert a.texts[0] == "ab" and "".join(a.texts) == "abxyzS"
    assert a.end.reason is FinishReason.STOP_SEQUENCE and a.end.usage.generated_chars == 7
    # K ramps 1 (prefill), 2, 4: the third call's chunk "STOP" is cut to "S".
    assert k == 1 or a.texts == ["ab", "x", "yz", "S"]


def test_backpressure_names_the_limit():
    core = make_core(FakeEngine(), max_active_streams=2, max_queue=1)
    for _ in range(3):
        submit(core)
    with pytest.raises(CapacityError) as e:
        submit(core)
    assert e.value.limit == "max_queue" and "max_queue=1" in str(e.value)
    drain(core)
    submit(core)  # room again
    core2 = make_core(FakeEngine(), max_active_streams=1, max_queue=0)
    submit(core2)
    with pytest.raises(CapacityError) as e:
        submit(core2)
    assert e.value.limit == "max_active_streams"


def test_a_stream_holds_its_slot_from_admission_to_its_end():
    """Callbacks run on the worker thread mid-tick, so a client can react to them at once: a stream
    whose first text is out but whose prefill step has not finished still holds its active slot,
    and a stream whose end is out no longer does."""
    core = make_core(FakeEngine(), max_active_streams=2, max_queue=1)
    outcomes: list[str] = []

    def submit_now(_event) -> None:
        try:
            submit(core, "b", 3)
            outcomes.append("admitted")
        except CapacityError as e:
            outcomes.append(e.limit)

    sink = Sink()
    core.submit(GenerationRequest("ab", 3, GREEDY), on_text=lambda t: (sink.text(t), submit_now(t)),
                on_end=sink.finish)
    submit(core, "ab", 3)
    submit(core, "abc", 3)  # waits: two are prefilled and active, one queued = the limit
    core.tick(0.0)  # prefill of the first two: its first text arrives with the limit reached
    assert outcomes[0] == "max_queue"
    drain(core)
    finished = Sink()
    core.submit(GenerationRequest("ab", 2, GREEDY), on_text=finished.text, on_end=submit_now)
    submit(core, "ab", 50)
    submit(core, "abc", 50)  # the limit again, until the two-char stream ends (in its decode step)
    core.tick(0.0)
    assert outcomes[-1] == "admitted"  # the slot was free the moment its end was out
    drain(core)


def test_a_closed_core_refuses_submits():
    core = make_core(FakeEngine())
    pending = submit(core)
    core.fail_all(BatcherClosedError("closing"))
    assert isinstance(pending.end, BatcherClosedError)
    with pytest.raises(BatcherClosedError):
        submit(core)


def test_queued_request_joins_when_a_slot_frees():
    engine = FakeEngine()
    core = make_core(engine, max_active_streams=1, max_queue=4)
    a, b = submit(core, "ab", 2), submit(core, "abc", 2)
    drain(core)
    assert engine.calls == [(1, 2), (1, 1), (1, 3), (1, 1)]
    assert isinstance(a.end, Finished) and isinstance(b.end, Finished)


def test_a_raising_callback_drops_only_its_stream():
    core = make_core(FakeEngine())

    def broken(_text: str) -> None:
        raise ValueError("consumer gone")

    core.submit(GenerationRequest("ab", 5, GREEDY), on_text=broken, on_end=lambda e: None)
    ok = submit(core, "ab", 5)
    drain(core)
    assert ok.end.reason is FinishReason.LENGTH and len(core.active) == 0


# Real models: the batched text is exactly the unbatched text (the guarantee for fp32 engines).

@pytest.fixture(scope="module")
def engines(model_repo):
    from nextchar.server.core.artifact import load_artifact
    from nextchar.server.core.engine import Engine

    out = {}
    for name in ("lstm", "gru", "rnn"):
        out[name] = Engine.load(load_artifact(model_repo / name / "1"))
        out[name].warmup()
    return out


PROMPTS = ("O say", "What so", "Whose broad", "O say", "And the", "Gave", "O’er the", "O")


def requests(n: int) -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    return [GenerationRequest(
        PROMPTS[i % len(PROMPTS)], int(rng.integers(20, 60)),
        SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.0, 1.5])), top_k=int(rng.choice([0, 5])),
                       top_p=float(rng.choice([1.0, 0.9]))),
        seed=1000 + i, stop=("\n",) if i % 3 == 0 else ())
        for i in range(n)]


def alone(engine, req: GenerationRequest) -> tuple[str, Finished]:
    return per_step_generate(engine, req)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_batched_equals_alone_bit_for_bit(engines, cell):
    engine = engines[cell]
    assert engine.batch_invariant
    reqs = requests(32)
    core = make_core(engine, max_batch_size=16)
    sinks = []
    for r in reqs:
        sink = Sink()
        core.submit(r, on_text=sink.text, on_end=sink.finish)
        sinks.append(sink)
    drain(core)
    assert max(core.stats.batch_sizes) == 16
    for r, s in zip(reqs, sinks, strict=True):
        text, fin = alone(engine, r)
        assert "".join(s.texts) == text
        assert (s.end.reason, s.end.usage) == (fin.reason, fin.usage)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_any_k_gives_the_per_step_text(engines, cell):
    """K chars per call, for K = 1, 4, 16, 64: the same seeded text as the per-step loop, and a
    stop sequence inside a chunk truncates the text there."""
    engine = engines[cell]
    reqs = requests(6)
    texts = [alone(engine, r) for r in reqs]
    stop_req = GenerationRequest("O say", 200, SamplingParams(temperature=0.0))
    full = alone(engine, stop_req)[0]
    stop = full[37:40]
    cut = full[:full.index(stop)]
    for k in (1, 4, 16, 64):
        core = make_core(engine, max_chars_per_call=k, max_call_s=10.0)
        sinks = [submit(core, r.prompt, r.max_new_chars, sampling=r.sampling, seed=r.seed, stop=r.stop)
                 for r in reqs]
        stopped = submit(core, "O say", 200, stop=(stop,))
        drain(core)
        assert ["".join(s.texts) for s in sinks] == [t for t, _ in texts], k
        assert [s.end.usage for s in sinks] == [f.usage for _, f in texts]
        assert "".join(stopped.texts) == cut and stopped.end.reason is FinishReason.STOP_SEQUENCE
        if k > 1:
            assert core.stats.decode_chars > core.stats.decode_calls


def test_async_streams_through_the_worker_thread(engines):
    engine = engines["gru"]
    batcher = Batcher(engine, BatchingConfig(max_batch_size=8, max_wait_s=0.01), name="gru")
    reqs = requests(8)
    long_request = GenerationRequest("O say", 100_000, SamplingParams(), seed=1)

    async def collect(req: GenerationRequest) -> tuple[str, Finished]:
        parts, end = [], None
        async for event in batcher.stream(req):
            if isinstance(event, TextChunk):
                parts.append(event.text)
            else:
                end = event
        return "".join(parts), end

    async def cancel_early() -> None:
        async with contextlib.aclosing(batcher.stream(long_request)) as events:
            async for event in events:
                if isinstance(event, TextChunk):
                    break  # closing the stream cancels it between two steps

    async def main():
        return await asyncio.gather(*(collect(r) for r in reqs), cancel_early())

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    for r, (text, fin) in zip(reqs, results[:-1], strict=True):
        assert (text, fin.reason) == (alone(engine, r)[0], alone(engine, r)[1].reason)
    assert batcher.core.stats.decode_rows > batcher.core.stats.decode_calls  # steps were shared


def test_cancel_from_another_thread_ends_the_stream(engines):
    batcher = Batcher(engines["lstm"], BatchingConfig(max_wait_s=0.0))
    gone, done, ends = threading.Event(), threading.Event(), []

    def on_text(_text: str) -> None:
        gone.set()  # the caller leaves as soon as the first text arrives

    def on_end(end) -> None:
        ends.append(end)
        done.set()

    try:
        batcher.submit(GenerationRequest("O say", 100_000, SamplingParams(), seed=3),
                       on_text=on_text, on_end=on_end, cancelled=gone.is_set)
        assert done.wait(30)
    finally:
        batcher.close()
    assert ends[0].reason is FinishReason.CANCELLED and ends[0].usage.generated_chars < 100_000


def test_close_ends_running_streams(engines):
    batcher = Batcher(engines["lstm"], BatchingConfig(max_wait_s=0.0))
    ends: list = []
    done = threading.Event()

    def on_end(end):
        ends.append(end)
        done.set()

    batcher.submit(GenerationRequest("O say", 100_000, SamplingParams(), seed=3),
                   on_text=lambda t: None, on_end=on_end)
    batcher.close()
    assert done.wait(10)
    assert isinstance(ends[0], BatcherClosedError) and not isinstance(ends[0], CapacityError)
    with pytest.raises(BatcherClosedError):
        batcher.submit(GenerationRequest("O", 1), on_text=lambda t: None, on_end=lambda e: None)


def test_the_scheduler_does_not_load_onnxruntime():
    """The scheduler codes against contract.ModelEngine; only the engine module imports onnxruntime."""
    import subprocess
    import sys

    code = ("import sys\nimport nextchar.server.scheduling.runner, nextchar.server.scheduling.batcher\n"
            "print(sorted(m for m in ('onnxruntime', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_a_failure_outside_an_engine_call_ends_every_stream_and_closes_the_batcher() -> None:
    """A bug in the tick (here: the engine's initial_state) must not leave streams waiting forever."""
    engine = FakeEngine()
    engine.initial_state = lambda batch: (_ for _ in ()).throw(MemoryError("no room for a state"))
    batcher = Batcher(engine, BatchingConfig(max_wait_s=0.0))
    ends: list[object] = []
    done = threading.Event()

    def on_end(end: object) -> None:
        ends.append(end)
        done.set()

    try:
        batcher.submit(GenerationRequest("abc", 5, GREEDY), on_text=lambda _: None, on_end=on_end)
        assert done.wait(10), "the stream never ended"
        assert len(ends) == 1 and isinstance(ends[0], MemoryError)
        with pytest.raises(BatcherClosedError):
            batcher.submit(GenerationRequest("abc", 5, GREEDY), on_text=lambda _: None, on_end=on_end)
    finally:
        batcher.close()


def test_callers_gone_during_a_ticks_prefills_cost_no_more_calls():
    """An idle batcher's tick prefills every admitted prompt length, a call each: a caller gone by the
    time its group's turn comes is not prefilled (it ends CANCELLED) and the tick's decode leaves it out."""
    engine = FakeEngine()
    core = make_core(engine, max_batch_size=8)
    gone = [False]
    sinks = [submit(core, "ab" + "a" * i, 5, cancelled=lambda: gone[0]) for i in range(4)]  # 4 lengths
    generate = engine.generate

    def first_call_then_everyone_leaves(*args):
        gone[0] = True
        return generate(*args)

    engine.generate = first_call_then_everyone_leaves
    core.tick(0.0)
    assert engine.calls == [(1, 2)]  # the first prefill; the other three lengths and the decode skipped
    assert all(s.end is not None and s.end.reason is FinishReason.CANCELLED for s in sinks[1:])
    assert core.tick(0.0) is None  # nothing left
    assert sinks[0].end is not None and sinks[0].end.reason is FinishReason.CANCELLED


def test_a_long_run_of_prefills_lets_new_arrivals_in_after_max_call_s():
    """The max_call_s break between prefill groups also holds for an idle batcher when more callers wait:
    the rest of the admitted go first next tick, in arrival order, with the newcomers."""
    clock = Clock()
    engine = FakeEngine()
    core = make_core(engine, clock=clock, max_batch_size=8, max_call_s=0.01)
    generate = engine.generate

    late: list[Sink] = []

    def slow(*args):
        clock.now += 0.02  # each call takes two max_call_s
        if not late:
            late.append(submit(core, "ab", 1))  # a caller arrives during the first prefill
        return generate(*args)

    engine.generate = slow
    sinks = [submit(core, "ab" + "a" * i, 1) for i in range(3)]  # 3 lengths: 3 prefill calls
    core.tick(clock.now)
    assert len(engine.calls) == 1  # one prefill, then the other two went back to wait
    assert [s.decoder.prompt_tokens.size for s in core.waiting] == [3, 4]  # in arrival order
    drain(core, clock)
    assert all(s.end is not None and s.end.reason is FinishReason.LENGTH for s in [*sinks, *late])
