"""Text -> token tensors: the seminar's sliding windows and char-rnn's contiguous, seeded streams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nextchar.training.corpora import CorpusError


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """text -> int64[len(text)] indices into `vocab` (every character must be in it)."""
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def check_trainable(text: str, name: str, seq_len: int, flag: str = "--seq") -> None:
    """The corpus problems no hyperparameter can fix, named before anything is written."""
    check_sizes(len(text), sorted(set(text)), name, seq_len, flag)


def check_sizes(chars: int, vocab: list[str], name: str, seq_len: int, flag: str = "--seq") -> None:
    """check_trainable for a corpus known by its length and vocabulary (e.g. a prepared token file)."""
    if not chars:
        raise CorpusError(f"corpus {name!r} is empty")
    if len(vocab) < 2:
        raise CorpusError(
            f"corpus {name!r} has only {len(vocab)} distinct character ({vocab[0]!r}); "
            "a model needs at least 2"
        )
    if chars <= seq_len:
        raise CorpusError(
            f"corpus {name!r} has {chars} characters, not more than the sequence length "
            f"{seq_len} ({flag}); it needs at least {seq_len + 1}"
        )


Tokens = torch.Tensor | np.ndarray  # 1-D token ids; a numpy array may be a np.memmap of a prepared corpus


def take_rows(tokens: Tokens, starts: list[int], length: int) -> torch.Tensor:
    """int64[len(starts), length]: tokens[s : s + length] for each start, reading only those slices."""
    if isinstance(tokens, torch.Tensor):
        return torch.stack([tokens[s : s + length] for s in starts]).long()
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def sliding_windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seminar's dataset: every window of `seq_len`, stride 1, and the same window shifted by one.

    tokens: int64[N] -> (x int64[N - seq_len, seq_len], y int64[N - seq_len, seq_len]), exactly
    `for i in range(0, len(text) - seq_len): x = text[i:i+seq_len]; y = text[i+1:i+seq_len+1]`.
    """
    n = tokens.numel() - seq_len
    idx = torch.arange(n)[:, None] + torch.arange(seq_len)[None, :]
    return tokens[idx], tokens[idx + 1]


def split(tokens: Tokens, val_fraction: float) -> tuple[Tokens, Tokens]:
    """Train on the head, validate on the tail (never shuffled: val text is text the model has not seen).

    Views, not copies, so a memory-mapped corpus stays on disk.
    """
    n_val = round(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


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
    With `shards` > 1 (data parallel) shard `shard` reads only its rows of that global batch.
    """

    tokens: Tokens  # [N]
    batch: int
    seq_len: int
    seed: int = 0
    random_offset: bool = True
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if self.batch % self.shards:
            raise CorpusError(f"--batch {self.batch} must be a multiple of the number of processes "
                              f"({self.shards}) so every process reads as many streams")
        if self.steps_per_epoch < 1:
            need = self.batch * self.seq_len + self.seq_len
            raise CorpusError(
                f"the split has {len(self.tokens)} characters, too few for --batch {self.batch} x "
                f"--seq {self.seq_len} (needs at least {need}); lower --batch or --seq"
            )

    @property
    def stream_len(self) -> int:
        # Leave seq_len characters of slack for the offset; the targets need one more character.
        return (len(self.tokens) - self.seq_len) // self.batch

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
        """step -> (x int64[rows, seq_len], y int64[rows, seq_len]); y is x shifted by one character.

        rows = batch / shards: this shard's streams of the global batch.
        """
        epoch, k = self.position(step)
        rows = self.batch // self.shards
        first = self.offset(epoch) + k * self.seq_len
        starts = [first + (self.shard * rows + i) * self.stream_len for i in range(rows)]
        xy = take_rows(self.tokens, starts, self.seq_len + 1)
        return xy[:, :-1], xy[:, 1:]
