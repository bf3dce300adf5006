"""Model hyperparameters as a frozen dataclass; torch-free so the CLI can parse without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

CELLS = ("rnn", "lstm", "gru")


class ConfigError(ValueError):
    """An invalid hyperparameter; the message names it and the allowed range."""


@dataclass(frozen=True)
class ModelConfig:
    """A character model: (one-hot | embedding) -> `num_layers` recurrent layers -> linear head.

    `embedding_dim == 0` means one-hot input of size `vocab_size` (the classic teaching setup).
    """

    vocab_size: int
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embedding_dim: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2 (a model needs two characters to choose), got {self.vocab_size}")
        if self.hidden_size < 1:
            raise ConfigError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.embedding_dim < 0:
            raise ConfigError(f"embedding_dim must be >= 0 (0 = one-hot input), got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)
