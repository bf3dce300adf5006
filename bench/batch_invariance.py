"""Does a stream's text depend on its batch mates? Seeded generations alone vs among 63 mates; step timings.

Usage: .venv/bin/python -m bench.batch_invariance --repo REPO [--models lstm gru rnn] [--rounds 4]
Prints, per model, variant (fp32 / int8) and lone-row mode (the engine's probed padding, or raw
onnxruntime), how many of the texts differ from the same request run alone, and per-step timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from nextchar.server.core.artifact import load_artifact
from nextchar.server.core.engine import Engine
from nextchar.server.core.generation import GenerationRequest, TextChunk, generate
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.scheduling.batching import BatchCore
from nextchar.server.scheduling.policy import BatchingConfig

PROMPTS = ("O say", "What so proudly", "Whose broad", "And the rocket", "Gave proof", "O’er the", "O")


def requests(round_: int, n: int, chars: int) -> list[GenerationRequest]:
    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], chars, SamplingParams(temperature=1.0),
                              seed=round_ * 1_000_003 + i) for i in range(n)]


def alone(engine: Engine, req: GenerationRequest) -> str:
    return "".join(e.text for e in generate(engine, req) if isinstance(e, TextChunk))


def batched(engine: Engine, reqs: list[GenerationRequest], batch: int) -> tuple[list[str], float]:
    core = BatchCore(engine, BatchingConfig(max_batch_size=batch, max_wait_s=0.0, max_active_streams=batch),
                     clock=time.perf_counter)
    texts: list[list[str]] = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        core.submit(r, on_text=texts[i].append, on_end=lambda e: None)
    t0 = time.perf_counter()
    while core.tick(time.perf_counter()) is not None:
        pass
    return ["".join(t) for t in texts], time.perf_counter() - t0


def step_ms(engine: Engine, batch: int, reps: int = 200) -> float:
    tokens = np.zeros((batch, 1), np.int64)
    state = engine.initial_state(batch)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, state = engine.step(tokens, state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def first_divergence(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["lstm", "gru", "rnn"])
    p.add_argument("--rounds", type=int, default=4, help="rounds of 64 seeded generations")
    p.add_argument("--chars", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    for name in args.models:
        for variant in ("fp32", "int8"):
            engine = Engine.load(load_artifact(args.repo / name / "1", variant=variant))
            engine.warmup()
            probed = engine.pad_single_rows
            for mode in ("probed", "raw"):
                if mode == "raw" and not probed:
                    continue  # the probe chose no padding: raw is the same run
                engine.pad_single_rows = probed if mode == "probed" else False
                differ, total, firsts, t_alone, t_batch = 0, 0, [], 0.0, 0.0
                for r in range(args.rounds):
                    reqs = requests(r, args.batch, args.chars)
                    t0 = time.perf_counter()
                    solo = [alone(engine, q) for q in reqs]
                    t_alone += time.perf_counter() - t0
                    together, dt = batched(engine, reqs, args.batch)
                    t_batch += dt
                    for a, b in zip(solo, together, strict=True):
                        total += 1
                        if a != b:
                            differ += 1
                            firsts.append(first_divergence(a, b))
                chars = total * args.chars
                where = f", first divergence at char {min(firsts)}..{max(firsts)}" if firsts else ""
                print(f"{name:5s} {variant} lone-rows={mode:6s} invariant={engine.batch_invariant!s:5s} "
                      f"texts differing {differ}/{total} ({100 * differ / total:.1f}%){where}; chars/s "
                      f"alone {chars / t_alone:,.0f}, batched x{args.batch} {chars / t_batch:,.0f}")
            engine.pad_single_rows = probed
            b1, bn = step_ms(engine, 1), step_ms(engine, args.batch)
            print(f"{name:5s} {variant} engine.step median: B=1 {b1:.3f} ms, B={args.batch} {bn:.3f} ms "
                  f"({bn / b1:.1f}x the time for {args.batch}x the rows)")


if __name__ == "__main__":
    main()
