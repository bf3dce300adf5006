"""The seminar's two runs, reproduced exactly: full-batch sliding windows, one-hot input, Adam lr 0.1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nextchar.training.config import RECIPES, ConfigError, ModelConfig
from nextchar.training.corpora import Corpus, build_vocab, load_corpus
from nextchar.training.data import check_trainable, encode, sliding_windows
from nextchar.training.model import CharModel


@dataclass(frozen=True)
class Preset:
    """The seminar's setup: hidden size = vocabulary size, linear V -> V, every window in one batch."""

    name: str
    corpus: str
    cell: str
    epochs: int
    lr: float = 0.1
    num_layers: int = 2
    seq_len: int = 10
    print_every: int = 10

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, hidden_size=vocab_size,
                           num_layers=self.num_layers, embedding_dim=0, dropout=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "seed-rnn": Preset("seed-rnn", corpus="goethe", cell="rnn", epochs=51),
    "seed-lstm": Preset("seed-lstm", corpus="anthem", cell="lstm", epochs=100),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        names = ", ".join([*PRESETS, *RECIPES])
        raise ConfigError(f"unknown preset {name!r} (--preset); choose one of {names}")
    return PRESETS[name]


def textimize(results: torch.Tensor, vocab: list[str]) -> str:
    """The seminar's textimize_result: the first window's argmax string, then each later window's last.

    results: int64[windows, seq_len] -> a string of seq_len + windows - 1 characters predicting text[1:].
    """
    first = "".join(vocab[t] for t in results[0].tolist())
    return first + "".join(vocab[t] for t in results[1:, -1].tolist())


def accuracy(reconstruction: str, text: str) -> float:
    """Fraction of characters of `reconstruction` equal to text[1:] (the teacher-forced targets)."""
    target = text[1:]
    return sum(a == b for a, b in zip(reconstruction, target, strict=True)) / len(target)


@dataclass
class PresetResult:
    model: CharModel
    vocab: list[str]
    corpus: Corpus
    history: list[dict]  # per epoch: epoch, loss, accuracy (of that epoch's forward, before its step)
    reconstruction: str  # of the trained model (after the last step)
    accuracy: float


def train_preset(preset: Preset, seed: int = 0,
                 on_epoch: Callable[[int, float, str], None] | None = None) -> PresetResult:
    """Run the seminar's loop: zero_grad, forward all windows, cross-entropy, backward, step.

    `on_epoch(epoch, loss, reconstruction)` sees each epoch's forward (before the step), and finally
    (epochs, loss, reconstruction) of the trained model.
    """
    corpus = load_corpus(preset.corpus)
    check_trainable(corpus.text, corpus.name, preset.seq_len, flag="the preset's sequence length")
    vocab = build_vocab(corpus.text)
    x, y = sliding_windows(encode(corpus.text, vocab), preset.seq_len)
    v = len(vocab)
    torch.manual_seed(seed)  # the seminar's model is the first thing made after the seed
    model = CharModel(preset.model_config(v))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), preset.lr)
    history = []
    for epoch in range(preset.epochs):
        optimizer.zero_grad()
        outputs, _ = model(x)
        loss = criterion(outputs.reshape(-1, v), y.view(-1))
        loss.backward()
        optimizer.step()
        text = textimize(outputs.argmax(dim=2), vocab)
        history.append({"epoch": epoch, "loss": loss.item(), "accuracy": accuracy(text, corpus.text)})
        if on_epoch:
            on_epoch(epoch, loss.item(), text)
    with torch.no_grad():
        outputs, _ = model(x)
        final_loss = criterion(outputs.reshape(-1, v), y.view(-1)).item()
    text = textimize(outputs.argmax(dim=2), vocab)
    if on_epoch:
        on_epoch(preset.epochs, final_loss, text)
    return PresetResult(model, vocab, corpus, history, text, accuracy(text, corpus.text))
