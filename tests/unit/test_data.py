"""Token data: the seminar's sliding windows and the seeded contiguous streams of the trainer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from nextchar.training.corpora import CorpusError, build_vocab  # noqa: E402
from nextchar.training.data import Streams, check_trainable, encode, sliding_windows, split  # noqa: E402


def test_sliding_windows_are_the_seminar_loop() -> None:
    text = "Knowing is not enough; we must apply."
    vocab = build_vocab(text)
    x, y = sliding_windows(encode(text, vocab), 10)
    index = {c: i for i, c in enumerate(vocab)}
    want_x, want_y = [], []
    for i in range(0, len(text) - 10):
        want_x.append([index[c] for c in text[i : i + 10]])
        want_y.append([index[c] for c in text[i + 1 : i + 11]])
    assert x.tolist() == want_x
    assert y.tolist() == want_y


def test_split_keeps_order_and_puts_val_at_the_tail() -> None:
    tokens = torch.arange(100)
    train, val = split(tokens, 0.1)
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))


def _streams(n: int = 1000, batch: int = 4, seq: int = 7, seed: int = 0) -> Streams:
    return Streams(torch.arange(n), batch, seq, seed)


def test_stream_targets_are_inputs_shifted_by_one_and_in_range() -> None:
    s = _streams()
    for step in range(3 * s.steps_per_epoch):
        x, y = s.batch_at(step)
        assert x.shape == y.shape == (4, 7)
        assert torch.equal(y, x + 1)  # tokens are arange, so "next character" is +1
        assert int(y.max()) < 1000


def test_consecutive_chunks_continue_each_stream_within_an_epoch() -> None:
    s = _streams()
    for step in range(s.steps_per_epoch - 1):
        x, _ = s.batch_at(step)
        nxt, _ = s.batch_at(step + 1)
        assert torch.equal(nxt[:, 0], x[:, -1] + 1)


def test_streams_are_disjoint_and_epochs_move_the_offset() -> None:
    s = _streams(seed=3)
    seen = torch.cat([s.batch_at(k)[0].reshape(-1) for k in range(s.steps_per_epoch)])
    assert seen.unique().numel() == seen.numel()  # no character read twice in an epoch
    offsets = {s.offset(e) for e in range(20)}
    assert len(offsets) > 1 and all(0 <= o < 7 for o in offsets)


def test_batch_is_a_pure_function_of_seed_and_step() -> None:
    a, b, c = _streams(seed=1), _streams(seed=1), _streams(seed=2)
    for step in (0, 5, 200, 1234):
        assert torch.equal(a.batch_at(step)[0], b.batch_at(step)[0])
    differs = [not torch.equal(a.batch_at(k)[0], c.batch_at(k)[0]) for k in range(0, 2000, 137)]
    assert any(differs)


def test_too_few_characters_for_batch_times_seq_names_the_flags() -> None:
    with pytest.raises(CorpusError, match=r"--batch 64 x --seq 100"):
        Streams(torch.arange(5000), 64, 100)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("", "is empty"), ("aaaa", "only 1 distinct character"), ("abcab", "5 characters, not more than")],
)
def test_untrainable_corpora(text: str, pattern: str) -> None:
    with pytest.raises(CorpusError, match=pattern):
        check_trainable(text, "c", 10)
