"""Sampler cost against an engine step: the portable sampler's share of a decode step, unbatched and batched.

Usage: .venv/bin/python -m bench.bench_sampler [--repo DIR] [--cell lstm] [--batches 1 8 64] [--vocab 100]

For each batch size B: one onnxruntime decode step (T=1, one thread) of the untrained 2-layer 256-unit
export, and the sampler's work for that step: `philox_uniforms` (B draws) plus `sample_rows` over B rows
(a third each plain temperature 1, top-k 10 + top-p 0.9, greedy). B=1 also times the unbatched loop's
path (`philox_uniform` + `sample`). Logits are random normals over the model's vocabulary and over
--vocab characters (a larger alphabet). Best of --repeats rounds; ratios are from the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import best_of, load_engine, machine, model_name, scratch_repo
from nextchar.server.core.sampling import (
    SamplingParams,
    philox_uniform,
    philox_uniforms,
    sample,
    sample_rows,
)

MIX = (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=10, top_p=0.9),
       SamplingParams(temperature=0.0))


def run(repo: Path, cell: str, batches: list[int], vocab: int, repeats: int) -> str:
    engine = load_engine(repo, model_name(cell), 1)
    rng = np.random.default_rng(0)
    lines = [f"Sampler vs one decode step of {cell.upper()}-256 x2 (1 onnxruntime thread); us per step, "
             f"best of {repeats}.", "",
             "| B | V | engine step | philox_uniforms | sample_rows | sampler / engine |",
             "|---|---|---|---|---|---|"]
    for b in batches:
        tokens, state = np.zeros((b, 1), np.int64), engine.initial_state(b)
        step = best_of(lambda: engine.step(tokens, state), repeats)  # noqa: B023 (called before the next b)
        seeds, draws = np.arange(b, dtype=np.uint64), np.full(b, 100, np.uint64)
        params = [MIX[i % len(MIX)] for i in range(b)]
        for v in (engine.vocab_size, vocab):
            logits = rng.normal(0, 3, (b, v)).astype(np.float32)
            u = philox_uniforms(seeds, draws)[:, 0]
            draw = best_of(lambda: philox_uniforms(seeds, draws), repeats)  # noqa: B023
            pick = best_of(lambda: sample_rows(logits, params, u), repeats)  # noqa: B023
            lines.append(f"| {b} | {v} | {step * 1e6:,.0f} | {draw * 1e6:,.0f} | {pick * 1e6:,.0f} | "
                         f"{(draw + pick) / step:.2f} |")
    lines += ["", "Unbatched loop (B=1): `philox_uniform` + `sample` per char.", "",
              "| V | params | engine step | sampler | sampler / engine |", "|---|---|---|---|---|"]
    tokens, state = np.zeros((1, 1), np.int64), engine.initial_state(1)
    step = best_of(lambda: engine.step(tokens, state), repeats)
    for v in (engine.vocab_size, vocab):
        row = rng.normal(0, 3, v).astype(np.float32)
        for p in MIX[:2]:
            cost = best_of(lambda: sample(row, p, philox_uniform(7, 100)), repeats)  # noqa: B023
            lines.append(f"| {v} | T={p.temperature:.2g} k={p.top_k} p={p.top_p:.2g} | {step * 1e6:,.0f} | "
                         f"{cost * 1e6:,.0f} | {cost / step:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None, help="a repo from bench.common.export_untrained")
    p.add_argument("--cell", default="lstm", choices=("lstm", "gru", "rnn"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--vocab", type=int, default=100, help="a second, larger alphabet for the sampler")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(machine())
    with scratch_repo(a.repo, cells=(a.cell,)) as repo:
        print(run(repo, a.cell, a.batches, a.vocab, a.repeats))


if __name__ == "__main__":
    main()
