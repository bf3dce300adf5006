"""The engine alone, no server: one generation call of 64 rows vs two concurrent calls of 32 rows on two
threads (one onnxruntime thread each, as `--model-instances 2` runs them): chars/s and CPU cores.

Usage: .venv/bin/python -m bench.bench_lanes [--repo DIR] [--calls 6] [--rounds 3]

Untrained 2-layer 256-unit models (bench.common's export), K = 64 chars per call, best of `rounds`.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import generation_args, load_engine, machine, model_name, scratch_repo

K = 64


def work(engine: Any, rows: int, calls: int) -> None:
    """`calls` generation calls of `rows` rows x K chars."""
    args = generation_args(engine, rows, K)
    for _ in range(calls):
        engine.generate(*args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None, help="reuse an export of bench.common")
    p.add_argument("--calls", type=int, default=6, help="calls per thread per round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    print(f"Machine: {machine()}")
    with scratch_repo(a.repo) as repo:
        for cell in ("lstm", "gru", "rnn"):
            e = load_engine(repo, model_name(cell), threads=1)

            for label, lanes, rows in (("1 call x 64 rows", 1, 64), ("2 calls x 32 rows at once", 2, 32)):
                best, cores = 0.0, 0.0
                for _ in range(a.rounds):
                    threads = [threading.Thread(target=work, args=(e, rows, a.calls)) for _ in range(lanes)]
                    t0, c0 = time.perf_counter(), time.process_time()
                    for th in threads:
                        th.start()
                    for th in threads:
                        th.join()
                    wall = time.perf_counter() - t0
                    rate = lanes * rows * K * a.calls / wall
                    if rate > best:
                        best, cores = rate, (time.process_time() - c0) / wall
                print(f"{cell}: {label}: {best:,.0f} chars/s, {cores:.2f} cores")


if __name__ == "__main__":
    main()
