"""TrainConfig validation and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from nextchar.training.config import ConfigError, TrainConfig

BASE = {"corpus": "goethe", "max_steps": 100}


@pytest.mark.parametrize(
    ("field", "value", "flag", "rule"),
    [
        ("lr", 0.0, "--lr", "> 0"),
        ("lr", -1e-3, "--lr", "> 0"),
        ("hidden_size", 0, "--hidden", ">= 1"),
        ("num_layers", 0, "--layers", ">= 1"),
        ("embedding_dim", -1, "--embedding", ">= 0"),
        ("dropout", 1.0, "--dropout", "in [0, 1)"),
        ("dropout", -0.1, "--dropout", "in [0, 1)"),
        ("batch_size", 0, "--batch", ">= 1"),
        ("seq_len", 0, "--seq", ">= 1"),
        ("grad_clip", -1.0, "--grad-clip", ">= 0"),
        ("eval_every", 0, "--eval-every", ">= 1"),
        ("val_fraction", 0.0, "--val-fraction", "in (0, 1)"),
        ("val_fraction", 1.0, "--val-fraction", "in (0, 1)"),
        ("temperature", 0.0, "--temperature", "> 0"),
        ("cell", "transformer", "--cell", "one of rnn, lstm, gru"),
        ("schedule", "linear", "--schedule", "one of cosine"),
        ("max_minutes", -1.0, "--max-minutes", ">= 0"),
        ("patience", -1, "--patience", ">= 0"),
    ],
)
def test_invalid_values_name_field_flag_and_range(field: str, value: object, flag: str, rule: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{**BASE, field: value})
    msg = str(e.value)
    assert field in msg and flag in msg and rule in msg and repr(value) in msg


def test_a_run_needs_a_limit_and_cosine_needs_a_horizon() -> None:
    with pytest.raises(ConfigError, match="--max-steps or --max-minutes"):
        TrainConfig(corpus="goethe", max_steps=0, max_minutes=0)
    with pytest.raises(ConfigError, match="cosine needs --max-steps"):
        TrainConfig(corpus="goethe", max_minutes=1, schedule="cosine")
    with pytest.raises(ConfigError, match="cosine-time needs --max-minutes"):
        TrainConfig(corpus="goethe", max_steps=10, schedule="cosine-time")
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(corpus="goethe", max_steps=10, warmup_steps=10)


def test_round_trips_through_a_dict() -> None:
    c = TrainConfig(corpus="x.txt", hidden_size=32, max_minutes=2.5, schedule="plateau")
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert c.model_config(40).hidden_size == 32 and c.model_config(40).vocab_size == 40


def test_learning_rate_schedules() -> None:
    torch = pytest.importorskip("torch")  # noqa: F841  (train.py imports torch)
    from nextchar.training.train import lr_at

    c = TrainConfig(corpus="goethe", lr=1.0, max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(c, 0, 1.0) == pytest.approx(0.1)  # warmup is linear from lr/warmup
    assert lr_at(c, 9, 1.0) == pytest.approx(1.0)
    assert lr_at(c, 10, 1.0) == pytest.approx(1.0)  # cosine starts at lr...
    assert lr_at(c, 60, 1.0) == pytest.approx(0.55)  # ...is halfway at the middle...
    assert lr_at(c, 110, 1.0) == pytest.approx(0.1)  # ...and ends at lr * min_lr_ratio
    assert lr_at(c, 60, 0.5) == pytest.approx(0.275)
    t = TrainConfig(corpus="goethe", lr=1.0, max_minutes=10, schedule="cosine-time", min_lr_ratio=0.0)
    assert lr_at(t, 5, 1.0, elapsed_s=300.0) == pytest.approx(0.5)
    assert lr_at(t, 5, 1.0, elapsed_s=900.0) == pytest.approx(0.0)
    k = TrainConfig(corpus="goethe", lr=0.3, max_steps=5, schedule="constant")
    assert all(math.isclose(lr_at(k, s, 1.0), 0.3) for s in range(5))
