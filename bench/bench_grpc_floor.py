"""What a bare grpc.aio server costs on this machine: the floor under nextchar's per-request figures.

Usage: .venv/bin/python -m bench.bench_grpc_floor [--repo DIR] [--seconds 10]

Three probes, each against what nextchar itself measures in bench_concurrent / bench_sessions:
- arrivals: a server whose GenerateStream answers one message at once; the bench_concurrent client
  opens 64 streams (5 runs): how long until the server has seen all 64, and the client's CPU.
- sessions: a server whose Session answers every append with five predictions, canned or after a real
  one-row step of the LSTM-256 x2 (the engine inline on the loop, top 5 built as nextchar does); the
  bench_sessions traffic (64 sessions x 20 keys/s for `seconds`): server CPU per key.
- cold step: one-row LSTM-256 x2 Engine.step, hot in a loop vs after touching 8 MB between steps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import free_port, machine, scratch_repo

MODEL = "lstm256"


def serve(port: int, repo: Path | None) -> None:
    """The bare server (its own process): canned answers, or a real step when `repo` is given."""
    import grpc

    from nextchar.v1 import inference_pb2 as pb
    from nextchar.v1 import inference_pb2_grpc as rpc

    engine = None
    if repo is not None:
        from nextchar.server.core.artifact import load_artifact
        from nextchar.server.core.engine import Engine
        from nextchar.server.core.scoring import top_entries
        from nextchar.server.edge import session_wire as sw

        engine = Engine.load(load_artifact(repo / MODEL / "1"), intra_op_threads=1)
    canned = pb.SessionPredictions(predictions=[
        pb.CharProbability(char=c, token_id=i, probability=0.1, logprob=-2.3) for i, c in enumerate("abcde")])

    class Bare(rpc.NextCharServicer):
        async def GenerateStream(self, request, context):  # type: ignore[no-untyped-def]
            yield pb.GenerateStreamResponse(text="ab")

        async def Session(self, requests, context):  # type: ignore[no-untyped-def]
            state = engine.initial_state(1) if engine is not None else None
            async for r in requests:
                if r.WhichOneof("action") == "open":
                    yield pb.SessionResponse(id=r.id, opened=pb.SessionOpened())
                    text = r.open.text[-1:]
                else:
                    text = r.append
                if engine is None:
                    yield pb.SessionResponse(id=r.id, text_chars=1, computed_chars=1, predictions=canned)
                    continue
                tokens = np.array([[engine.vocab_index[c] for c in text]], np.int64)
                logits, state = engine.step(tokens, state)
                yield sw.predictions(r.id, 1, 1, engine.vocab, top_entries(logits[0, -1], 5))

    async def run() -> None:
        server = grpc.aio.server()
        rpc.add_NextCharServicer_to_server(Bare(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def start(repo: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "bench.bench_grpc_floor", "--serve", str(port)]
    proc = subprocess.Popen(args + (["--repo", str(repo)] if repo else []), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"127.0.0.1:{port}"


async def arrivals(address: str, streams: int = 64, runs: int = 5) -> list[str]:
    from nextchar.client.client import AsyncNextCharClient

    lines = []
    async with AsyncNextCharClient(address, timeout=60) as c:
        async def one(i: int, firsts: list[float]) -> None:
            async for _ in c.generate_stream(MODEL, "O say", 2, seed=i):
                firsts.append(time.perf_counter())

        await asyncio.gather(*(one(i, []) for i in range(streams)))  # warm-up
        for _ in range(runs):
            firsts: list[float] = []
            t0, cpu0 = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one(i, firsts) for i in range(streams)))
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            lines.append(f"  {streams} streams: all answered within {wall * 1e3:.1f} ms (first "
                         f"{(min(firsts) - t0) * 1e3:.1f} ms); client CPU {cpu * 1e3:.1f} ms")
            await asyncio.sleep(0.2)
    return lines


def cold_step(repo: Path, n: int = 2000) -> str:
    from nextchar.server.core.artifact import load_artifact
    from nextchar.server.core.engine import Engine

    engine = Engine.load(load_artifact(repo / MODEL / "1"), intra_op_threads=1)
    state, token, junk = engine.initial_state(1), np.array([[3]], np.int64), np.ones(8 << 20, np.uint8)

    def mean_us(touch: bool) -> float:
        total = 0.0
        for _ in range(n):
            if touch:
                junk.sum()
            t = time.perf_counter()
            engine.step(token, state)
            total += time.perf_counter() - t
        return total / n * 1e6

    mean_us(False)
    hot, cold = mean_us(False), mean_us(True)
    return f"one-row step: {hot:.1f} us hot, {cold:.1f} us after touching 8 MB between steps"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None, help="a repo with lstm256/1 (default: export one)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve is not None:
        serve(a.serve, a.repo)
        return
    from bench.bench_sessions import typing

    out = [f"Command: python -m bench.bench_grpc_floor {' '.join(sys.argv[1:])}", f"Machine: {machine()}"]
    with scratch_repo(a.repo, ("lstm",)) as repo:
        proc, address = start(None)
        try:
            out.append("arrivals (bare GenerateStream, the bench_concurrent client):")
            out += asyncio.run(arrivals(address))
            samples, cpu = asyncio.run(typing(address, "session", 64, 20, a.seconds, 500, proc.pid))
            out.append(f"sessions, canned answers: {len(samples)} keys, server CPU "
                       f"{cpu / len(samples) * 1e3:.3f} ms per key")
        finally:
            proc.kill()
        proc, address = start(repo)
        try:
            samples, cpu = asyncio.run(typing(address, "session", 64, 20, a.seconds, 500, proc.pid))
            out.append(f"sessions, a real one-row step inline + top 5: {len(samples)} keys, server CPU "
                       f"{cpu / len(samples) * 1e3:.3f} ms per key")
        finally:
            proc.kill()
        out.append(cold_step(repo))
    out.append(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
