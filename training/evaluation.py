"""Validation loss over contiguous streams with carried state, and greedy or sampled text."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nextchar.training.data import Tokens, take_rows
from nextchar.training.model import CharModel


@torch.no_grad()
def evaluate(model: CharModel, tokens: Tokens, batch: int, seq_len: int) -> float:
    """Mean cross-entropy (nats/char) over all of `tokens`, read as contiguous streams with carried state.

    Runs on the model's device in float32; reads `tokens` (a tensor or a memory-mapped array) chunk by chunk.
    """
    device = next(model.parameters()).device
    n = len(tokens) - 1
    batch = max(1, min(batch, n // seq_len))
    length = n // batch
    starts = [i * length for i in range(batch)]
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    for c in range(0, length, seq_len):
        t = min(seq_len, length - c)
        xy = take_rows(tokens, [s + c for s in starts], t + 1).to(device)
        logits, state = model(xy[:, :-1], state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), xy[:, 1:].reshape(-1),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (batch * length)


@torch.no_grad()
def generate(model: CharModel, vocab: list[str], prime: str, n: int, temperature: float | None,
             generator: torch.Generator | None = None) -> str:
    """`n` characters after `prime`: greedy when temperature is None, else sampled with `generator`.

    Sampling happens on the CPU (with `generator`, a CPU generator) whatever the model's device.
    """
    device = next(model.parameters()).device
    index = {c: i for i, c in enumerate(vocab)}
    was_training = model.training
    model.eval()
    logits, state = model(torch.tensor([[index[c] for c in prime]], device=device), None)
    out = []
    for _ in range(n):
        last = logits[0, -1].float().cpu()
        if temperature is None:
            t = int(last.argmax())
        else:
            t = int(torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator))
        out.append(vocab[t])
        logits, state = model(torch.tensor([[t]], device=device), state)
    model.train(was_training)
    return "".join(out)
