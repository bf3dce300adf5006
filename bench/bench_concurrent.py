"""64 concurrent streaming clients: server aggregate chars/s vs an in-process batched loop and no batching.

Usage: .venv/bin/python -m bench.bench_concurrent [--streams 64] [--chars 300] [--repeats 5] [--cell lstm]
                                                  [--threads 1] [--server-flags "..."] [--out FILE]

Three processes besides this one: the in-process loop (server.batching.BatchCore at batch = streams,
the server's thread settings, no gRPC, ticked as fast as it goes), a server with batching on and a
server with batching off (both `nextchar serve` with --intra-op-threads = --threads, max-concurrent
above the stream count; otherwise default settings). This process is the client: `streams`
GenerateStream calls at once on one asyncio channel, seeded, temperature 1. Repeats interleave the
three so machine load hits all alike. Aggregate chars/s = all chars / wall time from the first
request to the last stream's end. Targets: batched server >= 0.6x the in-process loop, >= 5x the
unbatched server. Latencies: time to first char (request sent -> first text message, client side)
and the gap between a stream's consecutive text messages (a message carries every char generated
since the last one; see chars/message).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ROOT, machine, model_name, percentile, scratch_repo, start_server, stop_server

PROMPTS = ("O say can you see", "What so proudly we hailed", "And the rocket’s red glare", "O")


@dataclass
class Run:
    chars_per_s: float
    chars_per_cpu_s: float  # chars / CPU seconds of the generating process (all its threads)
    ttfc: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    chars_per_message: float = 0.0


def inprocess_worker(repo: Path, model: str, streams: int, chars: int, threads: int) -> None:
    """Stdin 'go' -> stdout chars/s of `streams` generations in one BatchCore at batch `streams`."""
    from bench.common import load_engine
    from nextchar.server.core.generation import GenerationRequest
    from nextchar.server.core.sampling import SamplingParams
    from nextchar.server.scheduling.batching import BatchCore, BatchingConfig

    engine = load_engine(repo, model, threads)
    config = BatchingConfig(max_batch_size=streams, max_wait_s=0.0, max_active_streams=streams, max_queue=0)
    for _ in sys.stdin:
        core = BatchCore(engine, config, clock=time.perf_counter)
        texts: list[str] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(streams):
            req = GenerationRequest(PROMPTS[i % len(PROMPTS)], chars, SamplingParams(temperature=1.0), seed=i)
            core.submit(req, on_text=texts.append, on_end=lambda e: None)
        while core.tick(time.perf_counter()) is not None:
            pass
        total = sum(map(len, texts))
        print(total / (time.perf_counter() - t0), total / (time.process_time() - cpu0), flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def clients(address: str, pid: int, model: str, streams: int, chars: int, seed0: int) -> Run:
    from nextchar.client.client import AsyncNextCharClient

    ttfc: list[float] = []
    gaps: list[float] = []
    counts = [0, 0]  # chars, messages

    async def one(i: int, c: AsyncNextCharClient) -> None:
        t0 = last = time.perf_counter()
        first = True
        stream = c.generate_stream(model, PROMPTS[i % len(PROMPTS)], chars, temperature=1.0, seed=seed0 + i)
        async for text in stream:
            now = time.perf_counter()
            (ttfc if first else gaps).append(now - (t0 if first else last))
            first, last = False, now
            counts[0] += len(text)
            counts[1] += 1

    async with AsyncNextCharClient(address, timeout=600) as c:
        await c.health()
        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        await asyncio.gather(*(one(i, c) for i in range(streams)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    if counts[0] != streams * chars:
        raise SystemExit(f"expected {streams * chars} chars, got {counts[0]}")
    return Run(counts[0] / wall, counts[0] / max(cpu, 1e-9), ttfc, gaps, counts[0] / counts[1])


def measure(cell: str, streams: int, chars: int, repeats: int, threads: int, server_flags: list[str],
            repo: Path) -> dict[str, list[Run]]:
    model = model_name(cell)
    worker = subprocess.Popen([sys.executable, "-m", "bench.bench_concurrent", "--worker", str(repo),
                               "--cell", cell, "--streams", str(streams), "--chars", str(chars),
                               "--threads", str(threads)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    common = ["--intra-op-threads", str(threads), "--max-concurrent", str(max(64, 2 * streams)),
              "--max-new-chars", str(max(chars, 10_000))]
    servers = {
        "batched": start_server(repo, *common, "--batching", "1", "--max-batch-size", str(streams),
                                *server_flags),
        "unbatched": start_server(repo, *common, "--batching", "0", *server_flags),
    }
    runs: dict[str, list[Run]] = {"inprocess": [], "batched": [], "unbatched": []}
    try:
        for proc, address in servers.values():  # warm-up: connections, first calls, caches
            asyncio.run(clients(address, proc.pid, model, streams, 20, 10_000))
        worker.stdin.write("go\n")
        worker.stdin.flush()
        worker.stdout.readline()
        for r in range(repeats):
            worker.stdin.write("go\n")
            worker.stdin.flush()
            runs["inprocess"].append(Run(*map(float, worker.stdout.readline().split())))
            for kind, (proc, address) in servers.items():
                runs[kind].append(asyncio.run(clients(address, proc.pid, model, streams, chars, r * 1000)))
    finally:
        worker.stdin.close()
        worker.wait(60)
        for proc, _ in servers.values():
            stop_server(proc)
    return runs


def report(runs: dict[str, list[Run]], cell: str, streams: int, chars: int, threads: int,
           command: str) -> str:
    med = statistics.median
    rate = {k: med(r.chars_per_s for r in v) for k, v in runs.items()}
    eff = {k: med(r.chars_per_cpu_s for r in v) for k, v in runs.items()}
    batched = runs["batched"]
    ratios_a = [b.chars_per_s / i.chars_per_s for b, i in zip(batched, runs["inprocess"], strict=True)]
    ratios_b = [b.chars_per_s / u.chars_per_s for b, u in zip(batched, runs["unbatched"], strict=True)]
    lines = [
        f"Command: `{command}`", f"Machine: {machine()}",
        f"{streams} concurrent streams x {chars} chars, 2-layer {cell.upper()}-256, temperature 1, "
        f"{threads} onnxruntime thread(s) everywhere; medians of "
        f"{len(runs['batched'])} interleaved repeats (ratios: median of per-repeat ratios).", "",
        "| | aggregate chars/s | chars per CPU-second | TTFC p50 / p99 ms | inter-message gap p50 / p99 ms "
        "| chars/message |",
        "|---|---|---|---|---|---|",
        f"| in-process batched loop (BatchCore, batch {streams}, no gRPC) | {rate['inprocess']:,.0f} | "
        f"{eff['inprocess']:,.0f} | | | |",
    ]
    for kind in ("batched", "unbatched"):
        ttfc = [t for r in runs[kind] for t in r.ttfc]
        gaps = [g for r in runs[kind] for g in r.gaps]
        cpm = med(r.chars_per_message for r in runs[kind])
        lines.append(f"| server, batching {'on' if kind == 'batched' else 'off'} | {rate[kind]:,.0f} | "
                     f"{eff[kind]:,.0f} | "
                     f"{percentile(ttfc, 50) * 1e3:.1f} / {percentile(ttfc, 99) * 1e3:.1f} | "
                     f"{percentile(gaps, 50) * 1e3:.1f} / {percentile(gaps, 99) * 1e3:.1f} | {cpm:.1f} |")
    a, b = med(ratios_a), med(ratios_b)
    lines += ["",
              f"- batched server / in-process batched loop: **{a:.3f}x** (target >= 0.6; per repeat "
              f"{', '.join(f'{x:.2f}' for x in ratios_a)}) — {'met' if a >= 0.6 else 'MISSED'}",
              f"- batched server / unbatched server: **{b:.3f}x** (target >= 5; per repeat "
              f"{', '.join(f'{x:.2f}' for x in ratios_b)}) — {'met' if b >= 5 else 'MISSED'}",
              f"- CPU cost (chars per CPU-second of the generating process, less sensitive to other jobs): "
              f"batched server / in-process loop {eff['batched'] / eff['inprocess']:.2f}x, batched / "
              f"unbatched server {eff['batched'] / eff['unbatched']:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (servers and loop)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--server-flags", default="", help="extra flags for both servers, e.g. '--flush-ms 20'")
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        inprocess_worker(a.worker, model_name(a.cell), a.streams, a.chars, a.threads)
        return
    with scratch_repo(a.repo, [a.cell]) as repo:
        runs = measure(a.cell, a.streams, a.chars, a.repeats, a.threads, shlex.split(a.server_flags), repo)
    command = "python -m bench.bench_concurrent " + " ".join(sys.argv[1:])
    text = report(runs, a.cell, a.streams, a.chars, a.threads, command)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
