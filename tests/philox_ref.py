"""The per-step reference for tests: the rule of docs/sampling.md written out plainly (one row, raw
parameters, the portable exp) over the real Philox uniforms, and the per-step generation loop."""

from __future__ import annotations

import numpy as np

from nextchar.server.core.sampling import philox_uniform, philox_uniforms, portable_exp


def uniform(seed: int, i: int) -> float:
    return philox_uniform(seed, i)


def uniforms(seeds, counters, k: int) -> np.ndarray:
    """float64[B, k]: row b, column j = uniform(seeds[b], counters[b] + j)."""
    return philox_uniforms(np.asarray(seeds, np.uint64), np.asarray(counters, np.uint64), k)


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    x = np.asarray(logits, np.float64)
    if np.isnan(x).any():
        return -1
    if temperature == 0 or not np.isfinite(x.max()):
        return int(np.argmax(x))  # ties: the lowest id
    filters = 0 < top_k < x.size or top_p < 1  # descending logits, ties by id; else id order
    order = np.argsort(-x, kind="stable") if filters else np.arange(x.size)
    n = x.size if top_k == 0 else min(top_k, x.size)
    w = portable_exp((x[order[:n]] - x.max()) / temperature)
    cum = np.cumsum(w)
    last = n - 1 if top_p >= 1 else min(n - 1, int((cum < top_p * cum[n - 1]).sum()))
    pick = min(last, int((cum[: last + 1] <= u * cum[last]).sum()))
    return int(order[pick])


def per_step_generate(engine, request):
    """The per-step loop of SAMPLER_SPEC: one engine.step per char, the numpy rule, uniform(seed, i).
    Returns (text, Finished): what every K and every batch must reproduce."""
    from nextchar.server.core.generation import Decoder

    dec = Decoder(request, engine.vocab, engine.vocab_index)
    p = request.sampling
    tokens, state, parts = dec.prompt_tokens[None, :], engine.initial_state(1), []
    while not dec.finished:
        logits, state = engine.step(tokens, state)
        u = uniform(request.seed, dec.generated_chars)
        token = sample(logits[0, -1], p.temperature, p.top_k, p.top_p, u)
        parts.append(dec.feed_token(token))
        tokens = np.array([[token]], np.int64)
    return "".join(parts), dec.finished_event()
