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
    dropout: float = 0.0  # between recurrent layers and before the head (training only)
    input_dropout: float = 0.0  # on the (embedded or one-hot) input characters (training only)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.vocab_size < 2:
            raise ConfigError(
                f"vocab_size must be >= 2 (a model needs two characters to choose), got {self.vocab_size}"
            )
        if self.hidden_size < 1:
            raise ConfigError(f"hidden_size must be >= 1, got {self.hidden_size}")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.embedding_dim < 0:
            raise ConfigError(f"embedding_dim must be >= 0 (0 = one-hot input), got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.input_dropout < 1.0:
            raise ConfigError(f"input_dropout must be in [0, 1), got {self.input_dropout}")

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


# cosine: over --max-steps (exactly resumable); cosine-time: over --max-minutes of wall time, which
# fits a time budget on a busy machine but depends on the clock, so its resume is not bit-exact.
SCHEDULES = ("cosine", "cosine-time", "plateau", "constant")

# Field -> command-line flag, so a ConfigError names what the user typed.
FLAGS = {
    "corpus": "--corpus", "cell": "--cell", "hidden_size": "--hidden", "num_layers": "--layers",
    "embedding_dim": "--embedding", "dropout": "--dropout",
    "input_dropout": "--input-dropout", "batch_size": "--batch", "seq_len": "--seq",
    "lr": "--lr", "weight_decay": "--weight-decay", "grad_clip": "--grad-clip", "schedule": "--schedule",
    "warmup_steps": "--warmup", "min_lr_ratio": "--min-lr-ratio", "max_steps": "--max-steps",
    "max_minutes": "--max-minutes", "eval_every": "--eval-every", "patience": "--patience",
    "val_fraction": "--val-fraction", "seed": "--seed", "sample_chars": "--sample-chars",
    "temperature": "--temperature", "ema": "--ema",
}


def _bad(field: str, rule: str, value: object) -> ConfigError:
    return ConfigError(f"{field} ({FLAGS[field]}) must be {rule}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One char-rnn style training run: contiguous streams, truncated BPTT, AdamW, clipping, schedule.

    Stops at `max_steps` (0 = no step limit), after `max_minutes` of wall time (0 = no limit), or when
    the validation loss has not improved for `patience` evaluations (0 = never); at least one of the
    first two must be set so a run always ends.
    """

    corpus: str
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embedding_dim: int = 0
    dropout: float = 0.0
    input_dropout: float = 0.0
    batch_size: int = 64
    seq_len: int = 100
    lr: float = 2e-3
    weight_decay: float = 0.0  # decoupled (AdamW), on weight matrices and embeddings, not biases
    grad_clip: float = 5.0  # max global grad norm; 0 = no clipping
    schedule: str = "cosine"  # see SCHEDULES; plateau halves lr after a flat val loss
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    max_steps: int = 0
    max_minutes: float = 0.0
    eval_every: int = 200
    patience: int = 10
    val_fraction: float = 0.1
    seed: int = 0
    sample_chars: int = 200
    temperature: float = 0.8
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and exported; 0 = off

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("corpus", bool(self.corpus), "a built-in corpus name or a file path"),
            ("cell", self.cell in CELLS, f"one of {', '.join(CELLS)}"),
            ("hidden_size", self.hidden_size >= 1, ">= 1"),
            ("num_layers", self.num_layers >= 1, ">= 1"),
            ("embedding_dim", self.embedding_dim >= 0, ">= 0 (0 = one-hot input)"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("input_dropout", 0.0 <= self.input_dropout < 1.0, "in [0, 1)"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("seq_len", self.seq_len >= 1, ">= 1"),
            ("lr", self.lr > 0.0, "> 0"),
            ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
            ("grad_clip", self.grad_clip >= 0.0, ">= 0 (0 = no clipping)"),
            ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("max_steps", self.max_steps >= 0, ">= 0 (0 = no step limit)"),
            ("max_minutes", self.max_minutes >= 0.0, ">= 0 (0 = no time limit)"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("patience", self.patience >= 0, ">= 0 (0 = no early stopping)"),
            ("val_fraction", 0.0 < self.val_fraction < 1.0, "in (0, 1)"),
            ("seed", self.seed >= 0, ">= 0"),
            ("sample_chars", self.sample_chars >= 0, ">= 0"),
            ("temperature", self.temperature > 0.0, "> 0"),
            ("ema", 0.0 <= self.ema < 1.0, "in [0, 1) (0 = off)"),
        ]
        for field, ok, rule in checks:
            if not ok:
                raise _bad(field, rule, getattr(self, field))
        if self.max_steps == 0 and self.max_minutes == 0.0:
            raise ConfigError("set --max-steps or --max-minutes (or both): a run needs a limit to end")
        if self.schedule == "cosine" and self.max_steps == 0:
            raise ConfigError("--schedule cosine needs --max-steps > 0 (its horizon); or use plateau")
        if self.schedule == "cosine-time" and self.max_minutes == 0.0:
            raise ConfigError("--schedule cosine-time needs --max-minutes > 0 (its horizon)")
        if self.warmup_steps and self.max_steps and self.warmup_steps >= self.max_steps:
            raise _bad("warmup_steps", f"< --max-steps ({self.max_steps})", self.warmup_steps)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size, cell=self.cell, hidden_size=self.hidden_size, num_layers=self.num_layers,
            embedding_dim=self.embedding_dim, dropout=self.dropout, input_dropout=self.input_dropout,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**d)


# Named char-rnn recipes for `nextchar train --preset NAME`: TrainConfig fields chosen by measurement
# (bench/results/train.md); any flag given beside --preset overrides the recipe's value.
RECIPES: dict[str, dict] = {
    "shakespeare": {
        "corpus": "../shared/data/tinyshakespeare.txt", "cell": "lstm", "hidden_size": 512, "num_layers": 2,
        "embedding_dim": 64, "dropout": 0.4, "input_dropout": 0.1, "weight_decay": 0.1, "ema": 0.998,
        "batch_size": 64, "seq_len": 128, "lr": 3e-3,
        "schedule": "cosine-time", "max_minutes": 59.0, "eval_every": 100, "patience": 0,
    },
}
