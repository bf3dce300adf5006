"""Cost of the operations layer: one stream's chars/s with and without the interceptors and engine metering.

Usage: .venv/bin/python -m bench.bench_ops REPO [--model lstm] [--chars 3000] [--pairs 12]

REPO is a model repository (e.g. the tests' `model_repo`). Three `nextchar serve` subprocesses run side by
side: "ops" (as shipped), "nometer" (engine steps not timed) and "plain" (no request interceptors and no
metering: the server before the ops layer). Each round streams the same request from each server in
alternating order so all see the same machine load; ratios are per-round ops/plain, median and quartiles.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time

from bench.common import free_port

_SERVE = """
import sys
from nextchar.server.ops import metrics, operations
mode = sys.argv[1]
if mode in ("plain", "nometer"):
    metrics.Metrics.metered = lambda self, loader: loader
if mode == "plain":
    init = operations.Operations.__init__
    def without_interceptors(self, *a, **k):
        init(self, *a, **k)
        self.interceptors = []
    operations.Operations.__init__ = without_interceptors
from nextchar.client.cli import main
sys.exit(main(["serve"] + sys.argv[2:]))
"""
MODES = ("plain", "nometer", "ops")


def main() -> None:
    from nextchar.client.client import NextCharClient

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repo")
    p.add_argument("--model", default="lstm")
    p.add_argument("--chars", type=int, default=3000)
    p.add_argument("--pairs", type=int, default=12)
    args = p.parse_args()
    servers = {}
    for mode in MODES:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, mode, "--model-repo", args.repo, "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
                                 "--max-new-chars", str(args.chars)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = NextCharClient(f"127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.health(timeout=2) == "SERVING":
                    break
            except Exception:  # not up yet; bounded by the deadline
                pass
            if time.monotonic() > deadline:
                sys.exit(f"server {mode} did not start")
            time.sleep(0.1)
        servers[mode] = (proc, client)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for r in range(args.pairs):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                started = time.perf_counter()
                client = servers[mode][1]
                stream = client.generate_stream(args.model, "O say", args.chars, temperature=1.0, seed=r)
                n = sum(len(piece) for piece in stream)
                rates[mode].append(n / (time.perf_counter() - started))
    finally:
        for proc, client in servers.values():
            client.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    for mode in ("nometer", "ops"):
        ratios = sorted(a / b for a, b in zip(rates[mode], rates["plain"], strict=True))
        q = statistics.quantiles(ratios, n=4)
        median = statistics.median(ratios)
        print(f"{mode}: {statistics.median(rates[mode]):,.0f} chars/s vs plain "
              f"{statistics.median(rates['plain']):,.0f}; per-round ratio median {median:.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {args.pairs} rounds)")


if __name__ == "__main__":
    main()
