"""What the sort costs in the generation graph: CPU per K-char call at batch 64 with every row unfiltered
(the graph's If skips TopK) vs one row with top_k 5 (every row of the Run goes through TopK).

Usage: .venv/bin/python -m bench.bench_sort_cost [--repo DIR] [--rounds 12] [--k 16]

Untrained 2-layer 256-unit models (bench.common's export), one onnxruntime thread, CPU time of
this thread (other jobs on the machine barely move it); interleaved rounds, best of each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import generation_args, load_engine, machine, model_name, scratch_repo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None, help="reuse an export of bench.common")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--k", type=int, default=16)
    a = p.parse_args()
    print(f"Machine: {machine()}")
    with scratch_repo(a.repo) as repo:
        for cell in ("lstm", "gru", "rnn"):
            e = load_engine(repo, model_name(cell), threads=1)
            b, k = 64, a.k
            tokens, state, u, t, unfiltered, top_p = generation_args(e, b, k)
            one_filters = unfiltered.copy()
            one_filters[0] = 5
            best = {"no sort": np.inf, "sort": np.inf}
            for _ in range(a.rounds):
                for name, top_k in (("no sort", unfiltered), ("sort", one_filters)):
                    c0 = time.thread_time()
                    e.generate(tokens, state, u, t, top_k, top_p)
                    best[name] = min(best[name], time.thread_time() - c0)
            print(f"{cell}: µs per iteration at batch {b}: no sort {best['no sort'] / k * 1e6:.0f}, sort "
                  f"{best['sort'] / k * 1e6:.0f}; sort / no sort {best['sort'] / best['no sort']:.3f}")


if __name__ == "__main__":
    main()
