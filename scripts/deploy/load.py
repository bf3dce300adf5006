"""Bounded gRPC load on one address, with an optional command (a replica kill) run part-way through."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc

from nextchar.v1 import inference_pb2, inference_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--server", default="127.0.0.1:50050", help="host:port to load (loopback only)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="O say")
    p.add_argument("--max-chars", type=int, default=200, help="characters per request")
    p.add_argument("--requests", type=int, default=300, help="total requests (the load is bounded)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--deadline", type=float, default=30.0, help="seconds per call")
    p.add_argument("--kill-after", type=int, default=0, help="run --kill-cmd once this many calls ended")
    p.add_argument("--kill-cmd", default="", help="shell command run part-way (e.g. kill one replica)")
    args = p.parse_args(argv)
    host = args.server.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        p.error(f"--server must be a loopback address, got {args.server!r}")
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 256:
        p.error("--requests must be in [1, 100000] and --concurrency in [1, 256]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    channel = grpc.insecure_channel(args.server)
    stub = inference_pb2_grpc.NextCharStub(channel)
    # Greedy decoding: every replica must return the very same text, so a wrong answer is visible too.
    request = inference_pb2.GenerateRequest(
        model=inference_pb2.ModelRef(name=args.model), prompt=args.prompt,
        max_new_chars=args.max_chars, temperature=0.0)
    lock = threading.Lock()
    done = 0
    killed_at: float | None = None
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    texts: Counter[str] = Counter()
    failed_after_kill = 0

    def one(_: int) -> None:
        nonlocal done, killed_at, failed_after_kill
        t0 = time.perf_counter()
        try:
            text = stub.Generate(request, timeout=args.deadline).text
            code = "OK"
        except grpc.RpcError as e:
            text, code = None, e.code().name
        elapsed = time.perf_counter() - t0
        run_kill = False
        with lock:
            done += 1
            codes[code] += 1
            latencies.append(elapsed)
            if text is not None:
                texts[text] += 1
            elif killed_at is not None:
                failed_after_kill += 1
            if args.kill_cmd and done == args.kill_after:
                killed_at, run_kill = time.perf_counter(), True
        if run_kill:
            # Run from the worker that crossed the mark, so the others keep the load going meanwhile.
            subprocess.run(args.kill_cmd, shell=True, check=True, timeout=60)
            print(f"load: ran {args.kill_cmd!r} after {args.kill_after} calls", file=sys.stderr)

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    channel.close()
    ok = codes.get("OK", 0)
    lat_ms = sorted(x * 1000 for x in latencies)
    report = {
        "server": args.server, "requests": args.requests, "concurrency": args.concurrency,
        "ok": ok, "failed": args.requests - ok, "codes": dict(codes),
        "failed_after_kill": failed_after_kill, "killed": killed_at is not None,
        "distinct_texts": len(texts), "wall_s": round(wall, 2), "rps": round(args.requests / wall, 1),
        "latency_ms": {"p50": round(statistics.median(lat_ms), 1),
                       "p99": round(lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))], 1),
                       "max": round(lat_ms[-1], 1)},
    }
    lat = report["latency_ms"]
    print(f"load: {ok}/{args.requests} OK, {args.requests - ok} failed, {len(texts)} distinct text(s), "
          f"{report['rps']} calls/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms")
    print(json.dumps(report))
    return 0 if ok == args.requests and len(texts) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
