"""The engine contract the scheduler codes against (a typing.Protocol) and pure-numpy state helpers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

State = tuple[np.ndarray, ...]  # (h,) or (h, c), each float32[num_layers, B, hidden_size]
# The generation graph's (server.core.kstep) inputs after the model's tokens and state, and its output.
GENERATION_INPUTS = ("u", "temperature", "top_k", "top_p")
GENERATION_OUTPUT = "new_tokens"


class ModelEngine(Protocol):
    """What the batcher, the runner and the generation loop need of a loaded model version.

    `server.core.engine.Engine` is the onnxruntime implementation; tests use numpy fakes.
    """

    name: str                    # the model's name (logs, metrics)
    vocab: tuple[str, ...]
    vocab_index: dict[str, int]
    vocab_size: int
    batch_invariant: bool | None  # is a row's output independent of its batch mates? None: unknown

    def initial_state(self, batch: int) -> State:
        """Zero state for `batch` streams."""
        ...

    def step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """tokens int64[B, T], state -> (logits float32[B, T, V], new state)."""
        ...

    def generate(self, tokens: np.ndarray, state: State, u: np.ndarray, temperature: np.ndarray,
                 top_k: np.ndarray, top_p: np.ndarray) -> tuple[np.ndarray, State]:
        """Step `tokens int64[B, T]`, then sample and step K times: returns (int64[B, K], state after
        stepping the first K-1 sampled chars, i.e. ready to step column K-1). Column i is sampled with
        `u float64[B, K]`[:, i] by the portable rule (temperature float64[B], top_k int64[B],
        top_p float64[B]); -1 marks a row whose logits held NaN."""
        ...


def take(state: State, rows: Sequence[int] | np.ndarray | slice) -> State:
    """The state rows `rows` as a new batch: float32[L, len(rows), H] each."""
    return tuple(s[:, rows, :] for s in state)


def concat_states(states: Sequence[State]) -> State:
    """Stack per-stream states along the batch axis, in order."""
    return tuple(np.concatenate(parts, axis=1) for parts in zip(*states, strict=True))
