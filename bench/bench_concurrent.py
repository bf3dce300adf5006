"""64 concurrent GenerateStream clients vs the in-process limit, for LSTM, GRU and RNN (issue 10).

Usage: .venv/bin/python -m bench.bench_concurrent [--cells lstm gru rnn] [--streams 64] [--chars 400]
                                                  [--repeats 3] [--server-flags "..."] [--out FILE]

Models: untrained 2-layer 256-unit exports over the tinyshakespeare character set (65 chars).
In-process limit: a plain onnxruntime loop over model.onnx stepping `streams` rows per call with numpy
sampling (temperature 0.8), in a worker process, at 1 and at 2 intra-op threads; the better of the two
is the limit. Server: `nextchar serve` with its defaults (plus --max-concurrent above the stream count)
in its own process; this process is the client: `streams` GenerateStream calls of `chars` chars at
once on one asyncio channel, temperature 0.8, seeded. Server CPU use in cores = its utime + stime
(/proc/PID/stat) over the run / wall time; the client's: this process's CPU time over the run / wall
time. Repeats interleave limit and server so load hits both
alike; figures are medians, the ratio is the median of per-repeat ratios. Target: >= 0.8x.
"Per CPU-second" compares chars per CPU-second (less moved by other jobs on a shared machine). The
server's CPU per char by thread (bench.common.thread_cpu): "loop", its main thread (the event loop:
gRPC's Python side, the handlers); "python", the threads Python started (the batchers, each running
its engine calls); "grpc", gRPC core's own threads.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    ROOT,
    cpu_seconds,
    export_untrained,
    machine,
    model_name,
    percentile,
    start_server,
    stop_server,
    thread_cpu,
)

PROMPTS = ("O say can you see", "What so proudly we hailed", "And the rockets red glare", "O")
TEMPERATURE = 0.8


@dataclass
class Run:
    chars_per_s: float
    cores: float  # CPU seconds of the generating process / wall seconds
    ttfc: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    chars_per_message: float = 0.0
    client_cores: float = 0.0  # CPU seconds of the client (this process) / wall seconds
    # The server's CPU per char by thread group (bench.common.thread_cpu): loop, python, grpc.
    per_char_us: dict[str, float] = field(default_factory=dict)


def limit_worker(repo: Path, model: str, streams: int, chars: int) -> None:
    """Stdin 'THREADS' -> stdout 'chars/s cores' of the plain loop: `streams` rows, `chars` steps."""
    import numpy as np
    import onnxruntime as ort

    path = repo / model / "1" / "model.onnx"
    sessions = {}
    for threads in (1, 2):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[threads] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sessions[1].get_inputs()]
    hidden = sessions[1].get_inputs()[1].shape
    rng = np.random.default_rng(0)
    for line in sys.stdin:
        session = sessions[int(line)]
        tokens = np.zeros((streams, 1), np.int64)
        state = [np.zeros((hidden[0], streams, hidden[2]), np.float32) for _ in names[1:]]
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(chars):
            logits, *state = session.run(None, dict(zip(names, [tokens, *state], strict=True)))
            x = logits[:, -1].astype(np.float64)
            cum = np.exp((x - x.max(axis=1, keepdims=True)) / TEMPERATURE).cumsum(axis=1)
            u = rng.random(streams)
            picked = (cum <= (u * cum[:, -1])[:, None]).sum(axis=1)
            tokens = np.minimum(picked, x.shape[1] - 1)[:, None].astype(np.int64)
        wall = time.perf_counter() - t0
        print(streams * chars / wall, (time.process_time() - cpu0) / wall, flush=True)


async def clients(address: str, pid: int, model: str, streams: int, chars: int, seed0: int) -> Run:
    from nextchar.client.client import AsyncNextCharClient

    ttfc: list[float] = []
    gaps: list[float] = []
    counts = [0, 0]  # chars, messages

    async def one(i: int, c: AsyncNextCharClient) -> None:
        t0 = last = time.perf_counter()
        first = True
        stream = c.generate_stream(model, PROMPTS[i % len(PROMPTS)], chars, temperature=TEMPERATURE,
                                   seed=seed0 + i)
        async for text in stream:
            now = time.perf_counter()
            (ttfc if first else gaps).append(now - (t0 if first else last))
            first, last = False, now
            counts[0] += len(text)
            counts[1] += 1

    async with AsyncNextCharClient(address, timeout=600) as c:
        await c.health()
        t0, cpu0, own0 = time.perf_counter(), cpu_seconds(pid), time.process_time()
        threads0 = thread_cpu(pid)
        await asyncio.gather(*(one(i, c) for i in range(streams)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
        threads = {k: (v - threads0[k]) / max(counts[0], 1) * 1e6 for k, v in thread_cpu(pid).items()}
    if counts[0] != streams * chars:
        raise SystemExit(f"expected {streams * chars} chars, got {counts[0]}")
    return Run(counts[0] / wall, cpu / wall, ttfc, gaps, counts[0] / counts[1], own / wall, threads)


def measure(cell: str, streams: int, chars: int, repeats: int, server_flags: list[str],
            repo: Path) -> dict[str, list[Run]]:
    model = model_name(cell)
    worker = subprocess.Popen([sys.executable, "-m", "bench.bench_concurrent", "--worker", str(repo),
                               "--cells", cell, "--streams", str(streams), "--chars", str(chars)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc, address = start_server(repo, "--max-concurrent", str(max(64, 2 * streams)), *server_flags)
    runs: dict[str, list[Run]] = {"limit1": [], "limit2": [], "server": []}

    def limit(threads: int) -> Run:
        worker.stdin.write(f"{threads}\n")
        worker.stdin.flush()
        return Run(*map(float, worker.stdout.readline().split()))

    try:
        asyncio.run(clients(address, proc.pid, model, streams, 20, 10_000))  # warm-up
        limit(1), limit(2)
        for r in range(repeats):
            runs["limit1"].append(limit(1))
            runs["server"].append(asyncio.run(clients(address, proc.pid, model, streams, chars, r * 1000)))
            runs["limit2"].append(limit(2))
    finally:
        worker.stdin.close()
        worker.wait(60)
        stop_server(proc)
    return runs


def report(all_runs: dict[str, dict[str, list[Run]]], streams: int, chars: int) -> list[str]:
    med = statistics.median
    lines = [
        f"{streams} concurrent GenerateStream clients x {chars} chars, 2-layer 256-unit models, "
        f"tinyshakespeare vocab (65), temperature {TEMPERATURE}; medians of interleaved repeats.", "",
        "| cell | limit 1 thread chars/s | limit 2 threads chars/s | server chars/s | server / best limit "
        "| server CPU cores | client CPU cores | per CPU-second: server / limit 1 thread | TTFC p50 / p99 ms "
        "| gap p50 / p99 ms | chars/message | server CPU µs/char: loop / python / grpc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, runs in all_runs.items():
        pairs = zip(runs["limit1"], runs["limit2"], strict=True)
        best = [max(a.chars_per_s, b.chars_per_s) for a, b in pairs]
        ratios = [s.chars_per_s / b for s, b in zip(runs["server"], best, strict=True)]
        ttfc = [t for r in runs["server"] for t in r.ttfc]
        gaps = [g for r in runs["server"] for g in r.gaps]
        ratio = med(ratios)
        split = " / ".join(f"{med(r.per_char_us[k] for r in runs['server']):.2f}"
                           for k in ("loop", "python", "grpc"))
        per_cpu = [(s.chars_per_s / s.cores) / (a.chars_per_s / a.cores)
                   for s, a in zip(runs["server"], runs["limit1"], strict=True)]
        lines.append(
            f"| {cell} | {med(r.chars_per_s for r in runs['limit1']):,.0f} | "
            f"{med(r.chars_per_s for r in runs['limit2']):,.0f} | "
            f"{med(r.chars_per_s for r in runs['server']):,.0f} | **{ratio:.2f}x** "
            f"({', '.join(f'{x:.2f}' for x in ratios)}) {'met' if ratio >= 0.8 else 'MISSED'} | "
            f"{med(r.cores for r in runs['server']):.2f} | "
            f"{med(r.client_cores for r in runs['server']):.2f} | {med(per_cpu):.2f} | "
            f"{percentile(ttfc, 50) * 1e3:.0f} / {percentile(ttfc, 99) * 1e3:.0f} | "
            f"{percentile(gaps, 50) * 1e3:.1f} / {percentile(gaps, 99) * 1e3:.1f} | "
            f"{med(r.chars_per_message for r in runs['server']):.1f} | {split} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--server-flags", default="", help="extra server flags, e.g. '--batching 0'")
    p.add_argument("--repo", type=Path, default=None, help="reuse an export (made with --shakespeare)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        limit_worker(a.worker, model_name(a.cells[0]), a.streams, a.chars)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        repo = a.repo or export_untrained(Path(d), a.cells, shakespeare=True)
        before = machine()
        all_runs = {cell: measure(cell, a.streams, a.chars, a.repeats, shlex.split(a.server_flags), repo)
                    for cell in a.cells}
    command = "python -m bench.bench_concurrent " + " ".join(sys.argv[1:])
    text = "\n".join([f"Command: `{command}`", f"Machine before: {before}", f"Machine after: {machine()}",
                      *report(all_runs, a.streams, a.chars)])
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
