"""Text -> token tensors: the seminar's sliding windows and char-rnn's contiguous, seeded streams."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nextchar.training.corpora import CorpusError


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """text -> int64[len(text)] indices into `vocab` (every character must be in it)."""
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def check_trainable(text: str, name: str, seq_len: int, flag: str = "--seq") -> None:
    """The corpus problems no hyperparameter can fix, named before anything is written."""
    if not text:
        raise CorpusError(f"corpus {name!r} is empty")
    distinct = len(set(text))
    if distinct < 2:
        raise CorpusError(
            f"corpus {name!r} has only {distinct} distinct character ({text[0]!r}); a model needs at least 2"
        )
    if len(text) <= seq_len:
        raise CorpusError(
            f"corpus {name!r} has {len(text)} characters, not more than the sequence length "
            f"{seq_len} ({flag}); it needs at least {seq_len + 1}"
        )


def sliding_windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seminar's dataset: every window of `seq_len`, stride 1, and the same window shifted by one.

    tokens: int64[N] -> (x int64[N - seq_len, seq_len], y int64[N - seq_len, seq_len]), exactly
    `for i in range(0, len(text) - seq_len): x = text[i:i+seq_len]; y = text[i+1:i+seq_len+1]`.
    """
    n = tokens.numel() - seq_len
    idx = torch.arange(n)[:, None] + torch.arange(seq_len)[None, :]
    return tokens[idx], tokens[idx + 1]


def split(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the head, validate on the tail (never shuffled: val text is text the model has not seen)."""
    n_val = round(tokens.numel() * val_fraction)
    return tokens[: tokens.numel() - n_val], tokens[tokens.numel() - n_val :]


def mix_seed(*xs: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is stable, but explicit is clearer)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Streams:
    """`batch` parallel contiguous streams over `tokens`, read in chunks of `seq_len`.

    Chunk k of every stream follows chunk k-1 in the text, so the trainer carries the hidden state
    across chunks (truncated BPTT). Each epoch starts the streams at a random offset in [0, seq_len)
    drawn from (seed, epoch), so chunk boundaries move between epochs while the batch for a given step
    is a pure function of (seed, step): a resumed run reads exactly what an uninterrupted one would.
    """

    tokens: torch.Tensor  # int64[N]
    batch: int
    seq_len: int
    seed: int = 0
    random_offset: bool = True

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1:
            need = self.batch * self.seq_len + self.seq_len
            raise CorpusError(
                f"the split has {self.tokens.numel()} characters, too few for --batch {self.batch} x "
                f"--seq {self.seq_len} (needs at least {need}); lower --batch or --seq"
            )

    @property
    def stream_len(self) -> int:
        # Leave seq_len characters of slack for the offset; the targets need one more character.
        return (self.tokens.numel() - self.seq_len) // self.batch

    @property
    def steps_per_epoch(self) -> int:
        return self.stream_len // self.seq_len

    def offset(self, epoch: int) -> int:
        if not self.random_offset:
            return 0
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return int(torch.randint(self.seq_len, (1,), generator=g))

    def position(self, step: int) -> tuple[int, int]:
        """step -> (epoch, chunk index within the epoch)."""
        return divmod(step, self.steps_per_epoch)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """step -> (x int64[batch, seq_len], y int64[batch, seq_len]); y is x shifted by one character."""
        epoch, k = self.position(step)
        starts = self.offset(epoch) + torch.arange(self.batch) * self.stream_len + k * self.seq_len
        idx = starts[:, None] + torch.arange(self.seq_len)[None, :]
        return self.tokens[idx], self.tokens[idx + 1]
