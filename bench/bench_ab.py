"""Server flag sets A/B: several servers up at once, 64-stream client runs alternating between them.

Usage: .venv/bin/python -m bench.bench_ab [--cell lstm] [--rounds 10] [--streams 64] [--chars 400]
                                          "FLAGS A" "FLAGS B" ...   ("" = the defaults)

Each round runs bench_concurrent's client once against every server in turn, so load changes hit all
alike; per flag set: median chars/s, server cores, server CPU µs per char (quartiles) and chars/message.
Server CPU per char moves far less with other jobs on the machine than chars/s does.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
from pathlib import Path

from bench.bench_concurrent import clients
from bench.common import export_untrained, machine, model_name, start_server, stop_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("flags", nargs="+", help="one server flag string per variant")
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--repo", type=Path, required=True, help="an export made with --shakespeare, or an empty "
                                                            "folder to export into")
    a = p.parse_args()
    model = model_name(a.cell)
    if not (a.repo / model).exists():
        export_untrained(a.repo, [a.cell], shakespeare=True)
    print(f"Machine before: {machine()}")
    servers = [start_server(a.repo, "--max-concurrent", str(max(64, 2 * a.streams)), *shlex.split(f))
               for f in a.flags]
    runs: dict[str, list] = {f: [] for f in a.flags}
    try:
        for proc, address in servers:  # warm-up
            asyncio.run(clients(address, proc.pid, model, a.streams, 20, 10_000))
        for r in range(a.rounds):
            for f, (proc, address) in zip(a.flags, servers, strict=True):
                runs[f].append(asyncio.run(clients(address, proc.pid, model, a.streams, a.chars, r * 1000)))
    finally:
        for proc, _ in servers:
            stop_server(proc)
    print(f"Machine after: {machine()}")
    med = statistics.median
    for f, rs in runs.items():
        us = [r.cores / r.chars_per_s * 1e6 for r in rs]
        q = statistics.quantiles(us, n=4)
        print(f"[{f or 'defaults'}] {a.cell} {a.streams}x{a.chars}: "
              f"{med(r.chars_per_s for r in rs):,.0f} chars/s, {med(r.cores for r in rs):.2f} cores, "
              f"server CPU {med(us):.2f} us/char ({q[0]:.2f}-{q[2]:.2f}), "
              f"{med(r.chars_per_message for r in rs):.1f} chars/message, "
              f"gap p50 {med(statistics.median(r.gaps) for r in rs) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
