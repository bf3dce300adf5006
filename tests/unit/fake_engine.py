"""Numpy stand-ins for server.engine.Engine: a tiny recurrent model and a scripted one."""

from __future__ import annotations

import numpy as np
from philox_ref import sample


class FakeEngine:
    """A small deterministic recurrent model: h' = tanh(A h + B onehot(tok)); logits = C h'.

    Same interface as Engine (vocab, vocab_size, initial_state, step); records every step's token shape.
    """

    def __init__(self, vocab: str = "abcdefgh \n", hidden: int = 8, seed: int = 0) -> None:
        self.vocab = tuple(vocab)
        self.vocab_size = len(self.vocab)
        self.vocab_index = {c: i for i, c in enumerate(self.vocab)}
        rng = np.random.default_rng(seed)
        self.hidden_size = hidden
        self.a = rng.normal(0, 0.5, (hidden, hidden)).astype(np.float32)
        self.b = rng.normal(0, 1.0, (hidden, self.vocab_size)).astype(np.float32)
        self.c = rng.normal(0, 2.0, (self.vocab_size, hidden)).astype(np.float32)
        self.calls: list[tuple[int, int]] = []
        self.name = "fake"
        self.batch_invariant: bool | None = True

    def initial_state(self, batch: int) -> tuple[np.ndarray, ...]:
        return (np.zeros((1, batch, self.hidden_size), np.float32),)

    def generate(self, *args):
        return generate_by_steps(self, *args)

    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
        assert tokens.dtype == np.int64 and tokens.ndim == 2
        self.calls.append(tokens.shape)
        h = state[0][0]
        out = []
        for t in range(tokens.shape[1]):
            # Row by row, so a row never depends on its batch mates (BLAS may pick kernels by batch size).
            pairs = zip(h, tokens[:, t], strict=True)
            h = np.stack([np.tanh(self.a @ row + self.b[:, tok]) for row, tok in pairs])
            out.append(np.stack([self.c @ row for row in h]))
        return np.stack(out, axis=1).astype(np.float32), (h[None].astype(np.float32),)


ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "


class ScriptedEngine:
    """Emits `script` one char per call (as overwhelming logits), whatever the input; for stop rules."""

    def __init__(self, script: str, vocab: str = ALPHABET) -> None:
        self.vocab = tuple(vocab)
        self.vocab_size = len(self.vocab)
        self.vocab_index = {c: i for i, c in enumerate(self.vocab)}
        self.script = script
        self.calls: list[tuple[int, int]] = []
        self.name = "scripted"
        self.batch_invariant: bool | None = True

    def generate(self, *args):
        return generate_by_steps(self, *args)

    def initial_state(self, batch: int) -> tuple[np.ndarray, ...]:
        return (np.zeros((1, batch, 1), np.float32),)

    def step(self, tokens: np.ndarray, state: tuple[np.ndarray, ...]):
        i = len(self.calls)
        self.calls.append(tokens.shape)
        logits = np.zeros((tokens.shape[0], tokens.shape[1], self.vocab_size), np.float32)
        logits[:, -1, self.vocab.index(self.script[i])] = 100.0
        return logits, state


def generate_by_steps(engine, tokens: np.ndarray, state, u: np.ndarray, temperature: np.ndarray,
                      top_k: np.ndarray, top_p: np.ndarray):
    """ModelEngine.generate for the fakes: the per-step loop with the numpy reference of the rule."""
    out = np.zeros(u.shape, np.int64)
    for i in range(u.shape[1]):
        if i:
            tokens = np.maximum(out[:, i - 1:i], 0)
        logits, state = engine.step(tokens, state)
        out[:, i] = [sample(row, temperature[b], top_k[b], top_p[b], u[b, i])
                     for b, row in enumerate(logits[:, -1])]
    return out, state
