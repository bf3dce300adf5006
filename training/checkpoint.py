"""The checkpoint record: a typed dataclass saved as plain tensors, numbers, strings, lists and dicts."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nextchar.training.config import ModelConfig

FORMAT = "nextchar.checkpoint.v1"


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """Everything a run writes: the model (config, vocab, weights) that export needs, then its provenance
    and, for char-rnn runs, the optimizer/schedule/RNG/hidden state an exact resume needs.

    Tensors are on the CPU whatever device trained them, so any checkpoint exports and serves on a CPU.
    `train_config` is a TrainConfig's dict (or a seminar preset's, with its "preset" name); `hidden` is
    the carried state of every stream of the global batch (float32[layers, batch, hidden] each).
    """

    model_config: ModelConfig
    vocab: list[str]
    model_state: dict[str, torch.Tensor]
    corpus: dict[str, Any] = field(default_factory=dict)  # name, sha256, bytes, chars
    train_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0
    metrics: list[dict] = field(default_factory=list)  # one record per evaluation (or per preset epoch)
    best_val: float = math.inf
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)  # kind, lr_scale, evals_since_best
    rng: dict[str, Any] = field(default_factory=dict)  # generator states; "ranks": every process's
    hidden: list[torch.Tensor] = field(default_factory=list)
    # With --ema, `model_state` is the weight average (what was evaluated and what export reads) and
    # this is the weights as trained, which a resume continues from; empty otherwise.
    train_state: dict[str, torch.Tensor] = field(default_factory=dict)
    reconstruction: str = ""  # seminar presets: the trained model's teacher-forced text
    accuracy: float = math.nan  # seminar presets: its accuracy against text[1:]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["model_config"] = asdict(self.model_config)
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> Checkpoint:
        """The record from a loaded dict; CheckpointError names `source` and what is wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"{source} is not a {FORMAT} file")
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("model_config", "vocab", "model_state") if k not in d]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}")
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise CheckpointError(f"{source} has unknown fields {', '.join(unknown)}")
        try:
            config = ModelConfig.from_dict(d["model_config"])
        except (TypeError, ValueError) as e:  # unknown/missing fields, or a value out of range
            raise CheckpointError(f"{source} has an invalid model_config: {e}") from None
        if len(d["vocab"]) != config.vocab_size:
            raise CheckpointError(
                f"{source}: vocab has {len(d['vocab'])} characters but vocab_size is {config.vocab_size}"
            )
        values = {k: v for k, v in d.items() if k in known}
        return cls(**{**values, "model_config": config, "vocab": list(d["vocab"])})


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt.to_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and check a checkpoint written by save_checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        # torch's text for a corrupt file runs to many lines of unpickling advice; its first line is enough.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a nextchar checkpoint: {reason}"
        ) from None
    return Checkpoint.from_dict(d, f"checkpoint {str(path)!r}")
