"""Time to first char against prompt length (10 ... 10,000 chars): the server vs one in-process prefill.

Usage: .venv/bin/python -m bench.bench_ttfc [--lengths 10 100 1000 10000] [--repeats 5] [--batching 0 1]

For each length: a max_new_chars=1 GenerateStream through `nextchar serve` (its own process; client in
this process), timed from the call to the first text message, against one Engine.step over the whole
prompt in a worker process of this module (no gRPC there). Interleaved; medians. The prompt
is a single engine call (no chunking), so both should grow linearly with the prompt length.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, machine, model_name, prompt_text, scratch_repo, start_server, stop_server

MODEL = model_name("lstm")


def worker(repo: Path) -> None:
    """Stdin N -> stdout seconds of one Engine.step over an N-char prompt from a zero state."""
    import numpy as np

    from bench.common import load_engine

    engine = load_engine(repo, MODEL)
    for line in sys.stdin:
        ids = np.array([[engine.vocab_index[c] for c in prompt_text(int(line))]], np.int64)
        t0 = time.perf_counter()
        engine.step(ids, engine.initial_state(1))
        print(time.perf_counter() - t0, flush=True)


def first_char_s(client, prompt: str) -> float:
    t0 = time.perf_counter()
    stream = client.generate_stream(MODEL, prompt, 1)
    pieces = iter(stream)
    next(pieces)
    elapsed = time.perf_counter() - t0
    for _ in pieces:
        pass
    return elapsed


def run(repo: Path, lengths: list[int], repeats: int, batching: list[int]) -> str:
    from nextchar.client.client import NextCharClient

    local = subprocess.Popen([sys.executable, "-m", "bench.bench_ttfc", "--worker", str(repo)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def prefill_s(n: int) -> float:
        local.stdin.write(f"{n}\n")
        local.stdin.flush()
        return float(local.stdout.readline())

    servers = {b: start_server(repo, "--intra-op-threads", "1", "--batching", str(b),
                               "--max-prompt-chars", str(max(lengths))) for b in batching}
    results: dict[tuple[str, int], list[float]] = {}
    try:
        clients = {b: NextCharClient(address, timeout=120) for b, (_, address) in servers.items()}
        for c in clients.values():
            first_char_s(c, prompt_text(10))
        for _ in range(repeats):
            for n in lengths:
                prompt = prompt_text(n)
                results.setdefault(("prefill", n), []).append(prefill_s(n))
                for b, c in clients.items():
                    results.setdefault((f"server{b}", n), []).append(first_char_s(c, prompt))
        for c in clients.values():
            c.close()
    finally:
        local.stdin.close()
        local.wait(60)
        for proc, _ in servers.values():
            stop_server(proc)
    med = statistics.median
    head = "| prompt chars | in-process prefill ms | " + " | ".join(
        f"server batching {'on' if b else 'off'} ms (ratio)" for b in batching) + " |"
    lines = [f"Time to first char vs prompt length, 2-layer LSTM-256, 1 onnxruntime thread; medians of "
             f"{repeats} interleaved repeats; ratio = server (client-side) / in-process prefill.", "",
             head, "|---|---|" + "---|" * len(batching)]
    for n in lengths:
        base = med(results[("prefill", n)])
        cells = [f"{med(results[(f'server{b}', n)]) * 1e3:.1f} ({med(results[(f'server{b}', n)]) / base:.2f})"
                 for b in batching]
        lines.append(f"| {n:,} | {base * 1e3:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batching", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker)
        return
    print(f"Command: `python -m bench.bench_ttfc {' '.join(sys.argv[1:])}`".replace("  ", " "))
    print(f"Machine: {machine()}")
    with scratch_repo(a.repo, ["lstm"]) as repo:
        print(run(repo, a.lengths, a.repeats, a.batching))


if __name__ == "__main__":
    main()
