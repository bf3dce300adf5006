"""The seminar presets: identical to the seminar's own code, and they memorise their text."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn, optim  # noqa: E402

from nextchar.training.config import ConfigError  # noqa: E402
from nextchar.training.corpora import BUILTIN  # noqa: E402
from nextchar.training.presets import PRESETS, accuracy, get_preset, textimize, train_preset  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def seminar(text: str, cell: str, epochs: int, seed: int) -> tuple[list[float], list[str]]:
    """The seminar's code as published, except the vocabulary is sorted (list(set()) is not stable)."""
    char_set = sorted(set(text))
    char_dict = {c: i for i, c in enumerate(char_set)}
    dict_size = len(char_dict)
    sequence_length = 10
    x_data, y_data = [], []
    for i in range(0, len(text) - sequence_length):
        x_data.append([char_dict[c] for c in text[i : i + sequence_length]])
        y_data.append([char_dict[c] for c in text[i + 1 : i + sequence_length + 1]])
    x_one_hot = np.array([np.eye(dict_size)[x] for x in x_data])
    X = torch.FloatTensor(x_one_hot)
    Y = torch.LongTensor(y_data)

    class CharRNN(nn.Module):
        def __init__(self, input_dim: int, hidden_dim: int, layers: int) -> None:
            super().__init__()
            rnn = nn.RNN if cell == "rnn" else nn.LSTM
            self.rnn = rnn(input_dim, hidden_dim, num_layers=layers, batch_first=True)
            self.fc = nn.Linear(hidden_dim, hidden_dim, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x, _status = self.rnn(x)
            return self.fc(x)

    torch.manual_seed(seed)
    model = CharRNN(dict_size, dict_size, 2)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), 0.1)
    losses, texts = [], []
    for _ in range(epochs):
        optimizer.zero_grad()
        outputs = model(X)
        loss = criterion(outputs.reshape(-1, dict_size), Y.view(-1))
        loss.backward()
        optimizer.step()
        results = outputs.argmax(dim=2)
        predict_str = ""
        for j, result in enumerate(results):
            if j == 0:
                predict_str += "".join([char_set[t] for t in result])
            else:
                predict_str += char_set[result[-1]]
        losses.append(loss.item())
        texts.append(predict_str)
    return losses, texts


@pytest.mark.parametrize("name", ["seed-rnn", "seed-lstm"])
def test_preset_is_the_seminar_run(name: str) -> None:
    preset = PRESETS[name]
    want_losses, want_texts = seminar(BUILTIN[preset.corpus], preset.cell, preset.epochs, seed=7)
    seen: list[tuple[int, float, str]] = []
    train_preset(preset, seed=7, on_epoch=lambda e, loss, t: seen.append((e, loss, t)))
    assert [t for _, _, t in seen[:-1]] == want_texts
    assert [loss for _, loss, _ in seen[:-1]] == want_losses  # bit-identical, not merely close
    assert seen[-1][0] == preset.epochs  # and one more report: the trained model


def test_preset_hyperparameters_are_the_seminars() -> None:
    rnn, lstm = PRESETS["seed-rnn"], PRESETS["seed-lstm"]
    assert (rnn.corpus, rnn.cell, rnn.epochs) == ("goethe", "rnn", 51)
    assert (lstm.corpus, lstm.cell, lstm.epochs) == ("anthem", "lstm", 100)
    for p in PRESETS.values():
        assert (p.lr, p.num_layers, p.seq_len) == (0.1, 2, 10)
        config = p.model_config(20)
        assert (config.hidden_size, config.embedding_dim, config.dropout) == (20, 0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_rnn_memorises_goethe_by_epoch_30(seed: int) -> None:
    text = BUILTIN["goethe"]
    at: dict[int, str] = {}
    train_preset(PRESETS["seed-rnn"], seed, on_epoch=lambda e, _loss, t: at.setdefault(e, t))
    assert len(at[30]) == len(text) - 1
    assert accuracy(at[30], text) >= 0.95, at[30]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_lstm_memorises_the_anthem_by_epoch_100(seed: int) -> None:
    result = train_preset(PRESETS["seed-lstm"], seed)
    assert result.accuracy >= 0.95, result.reconstruction
    assert result.history[0]["accuracy"] < 0.5  # it was learned, not there from the start


def test_textimize_takes_the_first_window_then_last_characters() -> None:
    vocab = list("abcd")
    results = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 0]])
    assert textimize(results, vocab) == "abcda"


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'seed-gru'.*seed-rnn, seed-lstm"):
        get_preset("seed-gru")
