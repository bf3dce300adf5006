"""Prompts through the engine in chunks, keeping only what the caller needs: memory follows the
configuration (chunk x vocabulary), not the prompt's length."""

from __future__ import annotations

from typing import Any

import numpy as np

# Positions per engine call when a prompt is longer. The logits of one call are float32[B, chunk, V]:
# with a 3,000-character vocabulary, 256 positions are 3 MB per row instead of 120 MB for 10,000.
PREFILL_CHUNK = 256


def prefill(engine: Any, tokens: np.ndarray, state: Any,
            chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, Any]:
    """Run `tokens: int64[B, T]` (T >= 1) from `state` in chunks of `chunk` positions.

    -> (last_logits float32[B, V], the state after the last position). Only engine.step is used, so
    any engine (or a counting wrapper) works; a recurrent state makes chunking exact.
    """
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be int64[B, T] with T >= 1, got shape {tokens.shape}")
    last = None
    for start in range(0, tokens.shape[1], chunk):
        logits, state = engine.step(np.ascontiguousarray(tokens[:, start:start + chunk]), state)
        last = logits[:, -1].copy()  # a copy: the chunk's full logits are freed now
        del logits
    assert last is not None
    return last, state
