"""CharRNN / CharLSTM / CharGRU: characters -> recurrent layers -> linear head over the vocabulary."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nextchar.training.config import ModelConfig

State = tuple[torch.Tensor, ...]  # (h,) for RNN/GRU, (h, c) for LSTM; each float32[layers, B, hidden]

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class CharModel(nn.Module):
    """The teaching material's CharRNN/CharLSTM, generalised.

    With one-hot input, hidden_size == vocab_size and 2 layers this is exactly the seminar's model:
    the recurrent module is created first and the head second, so a given torch seed yields the
    same initial weights as the seminar's code.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.embedding_dim:
            self.embed = nn.Embedding(c.vocab_size, c.embedding_dim)
        input_size = c.embedding_dim or c.vocab_size
        # nn.RNN/LSTM/GRU apply dropout between layers only; a single layer gets none.
        self.rnn = _CELLS[c.cell](
            input_size, c.hidden_size, num_layers=c.num_layers, batch_first=True,
            dropout=c.dropout if c.num_layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(c.dropout)
        self.input_drop = nn.Dropout(c.input_dropout)
        self.fc = nn.Linear(c.hidden_size, c.vocab_size, bias=True)

    def init_state(self, batch: int, device: torch.device | None = None) -> State:
        """Zero state for `batch` streams."""
        c = self.config
        shape = (c.num_layers, batch, c.hidden_size)
        n = 2 if c.has_cell_state else 1
        return tuple(torch.zeros(shape, device=device) for _ in range(n))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64[B, T] -> float32[B, T, input_size]."""
        if self.config.embedding_dim:
            return self.embed(tokens)
        return F.one_hot(tokens, self.config.vocab_size).float()

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """tokens: int64[B, T], state or None (zeros) -> (logits float32[B, T, V], new state)."""
        x = self.input_drop(self.encode(tokens))
        if state is None:
            state = self.init_state(tokens.shape[0], tokens.device)
        rnn_state = state if self.config.has_cell_state else state[0]
        y, new = self.rnn(x, rnn_state)
        logits = self.fc(self.drop(y))
        new_state = tuple(new) if self.config.has_cell_state else (new,)
        return logits, new_state


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
