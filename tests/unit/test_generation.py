"""The generation loop and the Decoder: prefill once, stop rules with hold-back, finish reasons."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fake_engine import FakeEngine, ScriptedEngine

from nextchar.server.core.generation import (
    Decoder,
    Finished,
    FinishReason,
    GenerationRequest,
    TextChunk,
    generate,
)
from nextchar.server.core.sampling import InvalidParameterError, SamplingParams, philox_uniform
from nextchar.server.core.vocab import OovPolicy

GREEDY = SamplingParams(temperature=0)


def run(engine, **kw) -> tuple[list[str], Finished]:
    kw.setdefault("prompt", "ab")
    kw.setdefault("max_new_chars", 50)
    kw.setdefault("sampling", GREEDY)
    events = list(generate(engine, GenerationRequest(**kw)))
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, TextChunk) and e.text for e in events[:-1])
    return [e.text for e in events[:-1]], events[-1]


def test_prompt_is_prefilled_in_one_call_then_one_call_per_char():
    engine = FakeEngine()
    chunks, fin = run(engine, prompt="abc d", max_new_chars=7)
    assert engine.calls == [(1, 5)] + [(1, 1)] * 6  # the last sampled char is never fed back
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.prompt_chars == 5 and fin.usage.generated_chars == 7
    assert len("".join(chunks)) == 7


def test_state_is_carried_between_steps():
    # Driving the Decoder by hand char by char from a zero state must give the same text as generate().
    engine = FakeEngine()
    req = GenerationRequest(prompt="bad", max_new_chars=20, sampling=SamplingParams(), seed=11)
    text = "".join(e.text for e in generate(engine, req) if isinstance(e, TextChunk))
    dec = Decoder(req, engine.vocab)
    state = engine.initial_state(1)
    for t in dec.prompt_tokens:
        logits, state = engine.step(np.array([[t]]), state)
    out = dec.feed(logits[0, -1])
    while not dec.finished:
        logits, state = engine.step(np.array([[dec.next_token]]), state)
        out += dec.feed(logits[0, -1])
    assert out == text and len(text) == 20


def test_greedy_is_deterministic_and_seed_independent():
    a = run(FakeEngine(), seed=1)[0]
    b = run(FakeEngine(), seed=2)[0]
    assert a == b


def test_same_seed_same_text_different_seed_different_text():
    texts = {s: "".join(run(FakeEngine(), sampling=SamplingParams(), seed=s, max_new_chars=40)[0])
             for s in (1, 1, 2, 3)}
    again = "".join(run(FakeEngine(), sampling=SamplingParams(), seed=1, max_new_chars=40)[0])
    assert texts[1] == again
    assert len(set(texts.values())) == 3


def test_char_i_is_sampled_with_draw_i_of_the_seed_greedy_or_not():
    """Flat logits over V chars: cum = 1..V, so char i is floor(u_i * V), u_i = philox_uniform(seed, i)."""
    vocab = tuple("abcdefgh")
    seed = 2**64 - 5
    dec = Decoder(GenerationRequest(prompt="a", max_new_chars=40, seed=seed), vocab)
    assert (dec.seed, dec.draws) == (seed, 0)
    text = "".join(dec.feed(np.zeros(len(vocab), np.float32)) for _ in range(40))
    assert text == "".join(vocab[int(philox_uniform(seed, i) * len(vocab))] for i in range(40))
    greedy = Decoder(GenerationRequest(prompt="a", max_new_chars=5, sampling=GREEDY, seed=seed), vocab)
    greedy.feed(np.zeros(len(vocab), np.float32))
    assert greedy.draws == 1  # a greedy char still owns its draw index


def test_max_new_chars_exact():
    chunks, fin = run(ScriptedEngine("abcdefgh"), max_new_chars=3)
    assert chunks == ["a", "b", "c"] and fin.reason is FinishReason.LENGTH


def test_echo_emits_the_prompt_as_the_model_read_it_first():
    chunks, _ = run(ScriptedEngine("xyz"), prompt="hi", max_new_chars=2, echo=True)
    assert chunks == ["hi", "x", "y"]
    chunks, fin = run(ScriptedEngine("xyz"), prompt="h!i", max_new_chars=1, echo=True,
                      oov_policy=OovPolicy.SKIP)
    assert chunks == ["hi", "x"] and fin.usage.prompt_chars == 2


def test_stop_sequence_spanning_chunks_is_never_partly_emitted():
    chunks, fin = run(ScriptedEngine("abXYcd"), stop=("XYc",))
    assert chunks == ["a", "b"]
    assert fin.reason is FinishReason.STOP_SEQUENCE and fin.stop_sequence == "XYc"
    assert fin.usage.generated_chars == 5


def test_held_text_is_released_once_it_cannot_be_a_stop():
    chunks, fin = run(ScriptedEngine("abXYcd"), stop=("XYZ",), max_new_chars=6)
    assert chunks == ["a", "b", "XYc", "d"] and fin.reason is FinishReason.LENGTH


def test_held_text_is_flushed_at_length():
    chunks, fin = run(ScriptedEngine("abXY"), stop=("XYZ",), max_new_chars=4)
    assert chunks == ["a", "b", "XY"] and fin.reason is FinishReason.LENGTH


def test_stop_at_the_very_start():
    chunks, fin = run(ScriptedEngine("STOPxyz"), stop=("STOP",))
    assert chunks == [] and fin.reason is FinishReason.STOP_SEQUENCE and fin.usage.generated_chars == 4


def test_stop_wins_over_length_on_the_same_char():
    chunks, fin = run(ScriptedEngine("abc"), stop=("bc",), max_new_chars=3)
    assert chunks == ["a"] and fin.reason is FinishReason.STOP_SEQUENCE


@pytest.mark.parametrize(("script", "stop", "text", "matched"), [
    ("xabcd", ("bcd", "abc"), "x", "abc"),      # the first to complete wins
    ("abcd", ("abcd", "bc"), "a", "bc"),        # a short stop inside a long one completes first
    ("xab", ("b", "ab"), "x", "ab"),            # completing together: the earliest start wins
    ("aaab", ("aab",), "a", "aab"),             # self-overlapping stop
    ("abab", ("abc", "bab"), "a", "bab"),       # a held prefix of one stop becomes another stop
])
def test_overlapping_stop_sequences(script, stop, text, matched):
    chunks, fin = run(ScriptedEngine(script), stop=stop)
    assert "".join(chunks) == text and fin.stop_sequence == matched


def test_stop_sequences_do_not_match_the_prompt():
    chunks, fin = run(ScriptedEngine("cx"), prompt="ab", stop=("bc", "ab"), max_new_chars=2)
    assert chunks == ["c", "x"] and fin.reason is FinishReason.LENGTH


def test_cancellation_stops_the_loop_and_drops_held_text():
    engine = ScriptedEngine("abXYZ")
    polls = itertools.count()
    events = list(generate(engine, GenerationRequest("ab", 50, GREEDY, stop=("XYZ",)),
                           cancelled=lambda: next(polls) >= 4))
    assert [e.text for e in events[:-1]] == ["a", "b"]  # "X" was held, then dropped
    assert events[-1].reason is FinishReason.CANCELLED
    assert len(engine.calls) == 4


def test_timings_come_from_the_injected_clock():
    ticks = itertools.count()
    events = list(generate(ScriptedEngine("abc"), GenerationRequest("ab", 3, GREEDY),
                           clock=lambda: float(next(ticks))))
    t = events[-1].timings
    # The Decoder reads the clock at creation (0), at the first char (1) and at the finish (2).
    assert t.time_to_first_char_s == 1.0 and t.total_s == 2.0


def test_decoder_refuses_feed_after_finish():
    dec = Decoder(GenerationRequest("ab", 1, GREEDY), tuple("abc"))
    dec.feed(np.array([0.0, 1.0, 0.0]))
    assert dec.finished and dec.next_token is None
    with pytest.raises(RuntimeError):
        dec.feed(np.array([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": ""}, "prompt"),
    ({"max_new_chars": 0}, "max_new_chars"),
    ({"max_new_chars": 10**9}, "max_new_chars"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ("",)}, "stop[0]"),
    ({"stop": ("a", "x" * 65)}, "stop[1]"),
    ({"stop": ("a",) * 17}, "stop"),
    ({"oov_replacement": "a"}, "oov_replacement"),
])
def test_request_validation_names_the_field(kwargs, field):
    kw = {"prompt": "ab", "max_new_chars": 5} | kwargs
    with pytest.raises(InvalidParameterError) as e:
        GenerationRequest(**kw)
    assert e.value.field == field


def test_prompt_with_no_known_char_is_rejected():
    with pytest.raises(InvalidParameterError, match="prompt"):
        Decoder(GenerationRequest("!?", 5, oov_policy=OovPolicy.SKIP), tuple("abc"))


@pytest.fixture(scope="module")
def lstm(model_repo):
    from nextchar.server.core.artifact import load_artifact
    from nextchar.server.core.engine import Engine

    return Engine.load(load_artifact(model_repo / "lstm" / "1"))


def test_real_model_greedy_equals_a_char_by_char_argmax_loop(lstm):
    chunks, fin = run(lstm, prompt="O say can", max_new_chars=60)
    state, text = lstm.initial_state(1), "O say can"
    for c in text:
        logits, state = lstm.step(np.array([[lstm.vocab_index[c]]]), state)
    out = ""
    for _ in range(60):
        c = lstm.vocab[int(np.argmax(logits[0, -1]))]
        out += c
        logits, state = lstm.step(np.array([[lstm.vocab_index[c]]]), state)
    assert "".join(chunks) == out
    assert fin.usage.prompt_chars == 9 and fin.usage.generated_chars == 60


def test_real_model_seeded_sampling_is_reproducible(lstm):
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.95)
    texts = ["".join(run(lstm, prompt="O say", max_new_chars=80, sampling=params, seed=s)[0])
             for s in (7, 7, 8)]
    assert texts[0] == texts[1] != texts[2]
