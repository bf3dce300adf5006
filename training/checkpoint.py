"""Checkpoints: plain tensors, numbers, strings, lists and dicts only (loadable with weights_only=True)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nextchar.training.config import ModelConfig

FORMAT = "nextchar.checkpoint.v1"

# Keys every checkpoint has. Training adds optimizer/scheduler/RNG state and progress counters
# (see train.py); export needs only these.
REQUIRED = ("format", "model_config", "vocab", "model_state")


class CheckpointError(ValueError):
    """A missing, corrupt or foreign checkpoint; the message names the file and the problem."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint written by save_checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        # torch's text for a corrupt file runs to many lines of unpickling advice; its first line is enough.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not a nextchar checkpoint: {reason}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT} file")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}")
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
    except (TypeError, ValueError) as e:  # unknown/missing fields, or a value out of range
        raise CheckpointError(f"checkpoint {str(path)!r} has an invalid model_config: {e}") from None
    if len(ckpt["vocab"]) != config.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: vocab has {len(ckpt['vocab'])} characters "
            f"but vocab_size is {config.vocab_size}"
        )
    return ckpt
