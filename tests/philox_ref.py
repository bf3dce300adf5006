"""A private numpy reference of SAMPLER_SPEC (Philox4x32-10 uniforms and the float64 rule), for tests only."""

from __future__ import annotations

import numpy as np

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        p0, p1 = M0 * c0, M1 * c2
        hi0, lo0, hi1, lo1 = p0 >> 32, p0 & MASK, p1 >> 32, p1 & MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < 9:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def uniform(seed: int, i: int) -> float:
    x0, x1, _, _ = philox((i & MASK, i >> 32, 0, 0), (seed & MASK, seed >> 32))
    return (((x1 << 32) | x0) >> 11) * 2.0**-53


def uniforms(seeds, counters, k: int) -> np.ndarray:
    """float64[B, k]: row b, column j = uniform(seeds[b], counters[b] + j)."""
    return np.array([[uniform(int(s), int(c) + j) for j in range(k)]
                     for s, c in zip(seeds, counters, strict=True)])


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    x = np.asarray(logits, np.float64)
    if np.isnan(x).any():
        return -1
    order = np.argsort(-x, kind="stable")
    if temperature == 0:
        return int(order[0])
    n = x.size if top_k == 0 else min(top_k, x.size)
    w = np.exp((x[order[:n]] - x[order[0]]) / temperature)
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
