"""Per-call trace of concurrent GenerateStream runs: where a short run's time goes (issue 10).

Usage: .venv/bin/python -m bench.trace_calls [--cell lstm] [--streams 64] [--chars 400] [--runs 3]
                                             [--calls] [--repo DIR] [--server-flags "..."]

Starts `nextchar serve` (defaults, as bench_concurrent) in a process that records, on the server's
clock, every generation-graph call (batcher thread, start, duration, its thread's CPU time, rows,
prompt length T, K), every submit to a batcher and every stream's end; this process runs the
bench_concurrent client (`streams` streams of `chars` chars, one asyncio channel) `runs` times, then
prints per run, in ms from the client's start: when the requests reached the batchers, when the first
full-batch call began, when the streams ended, each batcher's time inside engine calls, and the mean
cost of a row-char in calls with >= 16 rows (wall and CPU). `--calls` lists every call.
perf_counter is CLOCK_MONOTONIC on Linux, so both processes' times compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, export_untrained, free_port, machine, model_name


def traced_serve(out: Path, argv: list[str]) -> int:
    """The server, with its engine calls, submits and stream ends recorded; SIGUSR1 writes `out`."""
    from nextchar.client.cli import main
    from nextchar.server.core.engine import Engine
    from nextchar.server.scheduling.batching import BatchCore

    records: list[tuple] = []
    generate, submit, end = Engine._generate, BatchCore.submit, BatchCore._end

    def traced_generate(self, tokens, state, params):  # type: ignore[no-untyped-def]
        t0, c0 = time.perf_counter(), time.thread_time()
        result = generate(self, tokens, state, params)
        records.append(("call", threading.current_thread().name, t0, time.perf_counter(),
                        time.thread_time() - c0, tokens.shape[0], tokens.shape[1], params[0].shape[1]))
        return result

    def traced_submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        records.append(("submit", "", time.perf_counter()))
        return submit(self, *args, **kwargs)

    def traced_end(self, stream, outcome):  # type: ignore[no-untyped-def]
        records.append(("end", "", time.perf_counter()))
        return end(self, stream, outcome)

    Engine._generate, BatchCore.submit, BatchCore._end = traced_generate, traced_submit, traced_end

    def dump(*_: object) -> None:
        out.write_text(json.dumps(records))
        os._exit(0)

    signal.signal(signal.SIGUSR1, dump)
    return main(argv)


def report(records: list, runs: list[tuple[float, float, float]], show_calls: bool) -> list[str]:
    lines = []
    for t0, t1, chars_per_s in runs:
        def ms(t: float, t0: float = t0) -> float:
            return (t - t0) * 1e3
        own = [r for r in records if t0 <= r[2] <= t1 + 0.05]
        submits = [r[2] for r in own if r[0] == "submit"]
        ends = [r[2] for r in own if r[0] == "end"]
        calls = sorted((r for r in own if r[0] == "call"), key=lambda r: r[2])
        full = max(r[5] for r in calls)
        first_full = next(r[2] for r in calls if r[5] == full)
        big = [r for r in calls if r[5] >= 16 and r[6] == 1]
        busy: dict[str, float] = {}
        for r in calls:
            busy[r[1]] = busy.get(r[1], 0.0) + r[3] - r[2]
        row_chars = sum(r[5] * r[7] for r in big) or 1
        lines.append(
            f"run: {chars_per_s:,.0f} chars/s, {ms(t1):.0f} ms | requests at the batchers "
            f"{ms(min(submits)):.1f}..{ms(max(submits)):.1f} | first {full}-row call {ms(first_full):.1f} "
            f"| streams ended {ms(min(ends)):.0f}..{ms(max(ends)):.0f} | engine calls {len(calls)}, busy "
            + ", ".join(f"{name[-2:]} {s * 1e3:.0f}" for name, s in sorted(busy.items()))
            + f" ms | calls of >= 16 rows: {sum(r[3] - r[2] for r in big) / row_chars * 1e6:.1f} us wall, "
            f"{sum(r[4] for r in big) / row_chars * 1e6:.1f} us CPU per row-char")
        if show_calls:
            lines += [f"    {r[1][-2:]} {ms(r[2]):7.1f} +{(r[3] - r[2]) * 1e3:6.2f} ms "
                      f"(CPU {r[4] * 1e3:5.2f}) rows {r[5]:2d} T {r[6]:2d} K {r[7]:2d}" for r in calls]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--calls", action="store_true", help="list every engine call")
    p.add_argument("--repo", type=Path, default=None, help="reuse an export (made with --shakespeare)")
    p.add_argument("--server-flags", default="")
    p.add_argument("--serve-traced", type=Path, default=None, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.serve_traced:
        sys.exit(traced_serve(a.serve_traced, rest))
    from bench.bench_concurrent import clients
    from nextchar.client.client import NextCharClient

    with tempfile.TemporaryDirectory(prefix="trace-") as d:
        repo = a.repo or export_untrained(Path(d), [a.cell], shakespeare=True)
        trace, port = Path(d) / "trace.json", free_port()
        before = machine()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.trace_calls", "--serve-traced", str(trace), "serve", "--model-repo",
             str(repo), "--host", "127.0.0.1", "--port", str(port), "--admin-address", "127.0.0.1:0",
             "--log-level", "WARNING", "--max-concurrent", str(max(64, 2 * a.streams)),
             *shlex.split(a.server_flags)], cwd=ROOT)
        address, model, runs = f"127.0.0.1:{port}", model_name(a.cell), []
        try:
            with NextCharClient(address, timeout=2) as c:
                deadline = time.monotonic() + 120
                while not _serving(c):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the traced server did not start")
                    time.sleep(0.1)
            asyncio.run(clients(address, proc.pid, model, a.streams, 20, 10_000))  # warm-up
            for r in range(a.runs):
                time.sleep(0.3)
                t0 = time.perf_counter()
                run = asyncio.run(clients(address, proc.pid, model, a.streams, a.chars, r * 1000))
                runs.append((t0, time.perf_counter(), run.chars_per_s))
            proc.send_signal(signal.SIGUSR1)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        records = json.loads(trace.read_text())
    print(f"Command: python -m bench.trace_calls {' '.join(sys.argv[1:])}\nMachine before: {before}")
    print("\n".join(report(records, runs, a.calls)))
    print(f"Machine after: {machine()}")
    print(f"median {statistics.median(r[2] for r in runs):,.0f} chars/s")


def _serving(c) -> bool:  # type: ignore[no-untyped-def]
    from nextchar.client.errors import NextCharError

    try:
        return c.health() == "SERVING"
    except NextCharError:
        return False


if __name__ == "__main__":
    main()
