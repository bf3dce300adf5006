"""Teaching-material generation (re-run the whole growing text every char) vs carried state, 500 chars.

Usage: .venv/bin/python -m bench.bench_teaching [--repo DIR] [--chars 500] [--repeats 3]

The seminar's loop feeds the model the whole text so far from a zero state for every new char
(O(n^2) positions); the server's loop runs the prompt once and then carries the recurrent state
(O(n)). Both run server.engine.Engine (one onnxruntime thread) greedily from the same prompt, so
they must produce the same text; the ratio is teaching seconds / carried-state seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import CELLS, load_engine, machine, model_name, scratch_repo

PROMPT = "O say can you see"


def teaching(engine, prompt: np.ndarray, n: int) -> list[int]:
    """Every char: the whole sequence so far, from a zero state; take the last position's argmax."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = engine.step(np.array([seq], np.int64), engine.initial_state(1))
        seq.append(int(np.argmax(logits[0, -1])))
    return seq[len(prompt):]


def carried(engine, prompt: np.ndarray, n: int) -> list[int]:
    """Prefill once, then one T=1 step per char with the state carried over."""
    logits, state = engine.step(prompt[None, :], engine.initial_state(1))
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(logits[0, -1])))
        if len(out) == n:
            break
        logits, state = engine.step(np.array([[out[-1]]], np.int64), state)
    return out


def run(repo: Path, chars: int, repeats: int) -> str:
    lines = [f"Teaching-style generation vs carried state: {chars} greedy chars from {PROMPT!r}, "
             "1 onnxruntime thread; medians of interleaved repeats.", "",
             "| model | re-run growing text, chars/s | carried state, chars/s | speed-up | same text |",
             "|---|---|---|---|---|"]
    for cell in CELLS:
        engine = load_engine(repo, model_name(cell))
        prompt = np.array([engine.vocab_index[c] for c in PROMPT], np.int64)
        slow, fast, same = [], [], True
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = teaching(engine, prompt, chars)
            slow.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = carried(engine, prompt, chars)
            fast.append(time.perf_counter() - t0)
            same &= a == b
        s, f = statistics.median(slow), statistics.median(fast)
        lines.append(f"| {cell.upper()}-256 x2 | {chars / s:,.0f} | {chars / f:,.0f} | {s / f:.0f}x | "
                     f"{'yes' if same else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--chars", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="the slow side alone takes ~15 s per model")
    a = p.parse_args()
    print(machine())
    with scratch_repo(a.repo) as repo:
        print(run(repo, a.chars, a.repeats))


if __name__ == "__main__":
    main()
