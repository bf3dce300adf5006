"""Cancel latency while 64 streams run: from the caller's cancel to the stream's end, server defaults.

Usage: .venv/bin/python -m bench.bench_cancel [--cell lstm] [--streams 64] [--repeats 20]

A Batcher with the server's default BatchingConfig (K up to 64 chars per call, calls cut to ~30 ms) on
an untrained 2-layer 256-unit model (tinyshakespeare charset, onnxruntime threads = available cores)
runs `streams` long generations; every repeat cancels one of them (its `cancelled` callback turns
true, as the runner's does when the client goes away) and times until its on_end, then starts a
fresh one in its place. The gRPC hop in front adds what it always did; tests/integration's
test_a_cancel_stops_within_100ms_while_64_streams_run checks the whole path. Target: < 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import export_untrained, load_engine, machine, model_name, percentile


def measure(repo: Path, cell: str, streams: int, repeats: int) -> list[float]:
    from nextchar.server.core.generation import GenerationRequest
    from nextchar.server.core.sampling import SamplingParams
    from nextchar.server.scheduling.batcher import Batcher
    from nextchar.server.scheduling.policy import BatchingConfig

    engine = load_engine(repo, model_name(cell), threads=0)
    batcher = Batcher(engine, BatchingConfig(max_active_streams=streams + 1), name=cell)
    flags = [threading.Event() for _ in range(streams)]
    ended = [threading.Event() for _ in range(streams)]
    started = [threading.Event() for _ in range(streams)]

    def start(i: int) -> None:
        flags[i], ended[i], started[i] = threading.Event(), threading.Event(), threading.Event()
        flag, end, first = flags[i], ended[i], started[i]
        request = GenerationRequest("O say can you see", 100_000, SamplingParams(temperature=0.8), seed=i)
        batcher.submit(request,
                       on_text=lambda _t: first.set(), on_end=lambda _e: end.set(), cancelled=flag.is_set)

    latencies = []
    try:
        for i in range(streams):
            start(i)
        for ev in started:
            ev.wait(60)
        time.sleep(1.0)  # K has ramped up: the steady state
        for r in range(repeats):
            i = r % streams
            t0 = time.perf_counter()
            flags[i].set()
            batcher.wake()
            ended[i].wait(10)
            latencies.append(time.perf_counter() - t0)
            start(i)
            time.sleep(0.2)
    finally:
        for f in flags:
            f.set()
        batcher.close()
    return latencies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    before = machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        repo = export_untrained(Path(d), [a.cell], shakespeare=True)
        lat = measure(repo, a.cell, a.streams, a.repeats)
    print(f"Command: `python -m bench.bench_cancel {' '.join(sys.argv[1:])}`")
    print(f"Machine before: {before}\nMachine after: {machine()}")
    print(f"cancel -> end with {a.streams} streams running ({a.cell}, {a.repeats} cancels): median "
          f"{statistics.median(lat) * 1e3:.1f} ms, p90 {percentile(lat, 90) * 1e3:.1f} ms, max "
          f"{max(lat) * 1e3:.1f} ms (target < 100 ms)")


if __name__ == "__main__":
    main()
