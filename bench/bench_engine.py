"""Engine ceiling: chars/s of one onnxruntime decode step (T=1) at batch 1..128 for LSTM/GRU/RNN-256.

Usage: .venv/bin/python -m bench.bench_engine [--repo DIR] [--batches 1 8 32 64 128] [--threads 1]

The step is server.engine.Engine.step with one onnxruntime intra-op thread (the server's default),
on untrained 2-layer one-hot exports (weights do not change the cost of a step). chars/s = batch /
seconds per step; "x batch 1" is that over the batch-1 rate, measured in the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.common import CELLS, best_of, load_engine, machine, model_name, scratch_repo


def step_seconds(engine, batch: int, repeats: int) -> float:
    tokens = np.zeros((batch, 1), np.int64)
    state = engine.initial_state(batch)
    return best_of(lambda: engine.step(tokens, state), repeats)


def run(repo: Path, batches: list[int], threads: int, repeats: int) -> str:
    lines = [f"Engine ceiling: one decode step (T=1), {threads} onnxruntime thread(s); chars/s = batch / s "
             "per step; best of --repeats rounds (other jobs only add time).", "",
             "| model | " + " | ".join(f"B={b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for cell in CELLS:
        engine = load_engine(repo, model_name(cell), threads)
        rates = [b / step_seconds(engine, b, repeats) for b in batches]
        cells = [f"{r:,.0f} ({r / rates[0]:.1f}x)" for r in rates]
        lines.append(f"| {cell.upper()}-256 x2 | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None, help="a repo from bench.common.export_untrained")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(machine())
    with scratch_repo(a.repo) as repo:
        print(run(repo, a.batches, a.threads, a.repeats))


if __name__ == "__main__":
    main()
