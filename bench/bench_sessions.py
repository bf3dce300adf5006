"""Typing sessions vs PredictNext on the whole text: per-keystroke latency and server CPU as texts grow.

Usage: .venv/bin/python -m bench.bench_sessions [--sessions 64] [--rate 20] [--seconds 30] [--start-chars 500]
                                               [--server-flags "--session-wait-ms 2"]
                                               [--baseline-seconds 10] [--baseline-start-chars 1000 2000]
                                               [--idle 1000] [--idle-ttl 10] [--rounds 3] [--repo DIR]
                                               [--out FILE]

Model: an untrained LSTM-256 x2 (anthem vocabulary); untrained weights cost the same per step.
Traffic: `sessions` clients on one asyncio channel, each starting from `start-chars` of text and typing
`rate` characters per second for `seconds` (a key waits for the previous answer: closed loop, on
schedule unless the server falls behind), so texts grow from start-chars to start-chars + rate x
seconds. Session mode: one Session stream each, an append per key, answered with the top 5.
Baseline: the same keys, each a PredictNext on the whole text so far, with texts starting at each
--baseline-start-chars (1,000 and 2,000) for --baseline-seconds (10): it saturates the server long
before the sessions' rate, so its texts barely grow and a shorter run measures the same thing.
Both run on one server, alternating in `rounds` rounds (each a third of `seconds` of typing, texts going on
where the last round's stopped, then a third of each baseline), so a change in the machine's speed hits
both sides of the ratio alike; the ratio is printed over all rounds and per round.
Server CPU = utime + stime of the `nextchar serve` process over the typing phase (/proc), per keystroke
answered; onnxruntime wall time = the server's nextchar_engine_step_duration_seconds sum per keystroke.
Idle: `idle` sessions of the same model, each typed 20 characters (so each keeps its 16 saved
states), then left idle; RSS of the server before, with them open, and after the idle TTL evicted them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import free_port, machine, percentile, prompt_text, scratch_repo, start_server, stop_server

MODEL = "lstm256"
BUCKETS = 4  # latency reported per quarter of the text-length range
METRICS = ('nextchar_batch_size_count{model="lstm256"}', 'nextchar_batch_size_sum{model="lstm256"}',
           'nextchar_engine_step_duration_seconds_sum{model="lstm256"}')


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def typing(address: str, mode: str, sessions: int, rate: float, seconds: float, start: int,
                 pid: int) -> tuple[list[tuple[int, float]], float]:
    """[(text length after the key, seconds from send to answer)], server CPU seconds while typing."""
    from nextchar.client.client import AsyncNextCharClient

    text = prompt_text(start + int(rate * seconds) + 1)
    samples: list[tuple[int, float]] = []
    async with AsyncNextCharClient(address, timeout=600) as client:
        opened: list = [None] * sessions
        if mode == "session":
            opened = await asyncio.gather(*[client.session(MODEL, n=5, text=text[:start])
                                            for _ in range(sessions)])
        began = time.monotonic()
        cpu0 = cpu_s(pid)

        async def one(i: int, session) -> None:
            await asyncio.sleep(i / sessions / rate)  # spread the sessions' keys over a key period
            t0 = time.monotonic()
            for k in range(int(rate * seconds)):
                due = t0 + k / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                length = start + k + 1
                sent = time.perf_counter()
                if session is not None:
                    await session.append(text[length - 1])
                else:
                    await client.predict_next(MODEL, text[:length], 5)
                samples.append((length, time.perf_counter() - sent))
                if time.monotonic() - began > seconds * 3:  # far behind: stop, the figures say so
                    return

        await asyncio.gather(*[one(i, s) for i, s in enumerate(opened)])
        cpu = cpu_s(pid) - cpu0
        for s in opened:
            if s is not None:
                await s.close()
    return samples, cpu


def report(name: str, samples: list[tuple[int, float]], cpu: float, start: int,
           end: int) -> tuple[str, float]:
    lines = [f"{name}: {len(samples)} keystrokes, server CPU {cpu:.1f} s = "
             f"{cpu / max(1, len(samples)) * 1e3:.3f} ms per keystroke"]
    width = (end - start) / BUCKETS
    for b in range(BUCKETS):
        lo, hi = start + b * width, start + (b + 1) * width
        lat = [s for n, s in samples if lo < n <= hi]
        lines.append(f"  text {lo:>6.0f}-{hi:<6.0f} chars: {len(lat):>6} keys  "
                     f"p50 {percentile(lat, 50) * 1e3:8.2f} ms  p99 {percentile(lat, 99) * 1e3:8.2f} ms")
    return "\n".join(lines), cpu / max(1, len(samples))


def scrape(port: int, metric: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(metric + " "):
            return float(line.split()[1])
    return float("nan")


async def idle(repo: Path, count: int, ttl: float) -> str:
    from nextchar.client.client import AsyncNextCharClient
    from nextchar.server.core.session import SessionLimits, session_bound_bytes

    mport = free_port()
    proc, address = start_server(repo, "--max-sessions", str(count + 10), "--session-idle-ttl", str(ttl),
                                 "--metrics-port", str(mport))
    try:
        before = rss_mib(proc.pid)
        text = prompt_text(20)
        async with AsyncNextCharClient(address, timeout=600) as client:
            sessions = []
            for i in range(0, count, 100):
                batch = min(100, count - i)
                sessions += await asyncio.gather(*[client.session(MODEL, n=0) for _ in range(batch)])
            for ch in text:
                await asyncio.gather(*[s.append(ch) for s in sessions])
            held = rss_mib(proc.pid)
            active = scrape(mport, "nextchar_sessions_active")
            state = scrape(mport, "nextchar_session_state_bytes")
            t0 = time.monotonic()
            while scrape(mport, "nextchar_sessions_active") > 0 and time.monotonic() - t0 < ttl * 4 + 30:
                await asyncio.sleep(0.5)
            evicted_after = time.monotonic() - t0
            await asyncio.sleep(2)
            after = rss_mib(proc.pid)
            left = scrape(mport, "nextchar_sessions_active")
        bound = session_bound_bytes(SessionLimits(), 2, 256, 2, 30)
        return (f"idle: {count} LSTM-256x2 sessions of 20 typed chars: server RSS {before:.1f} MiB before, "
                f"{held:.1f} MiB with them open (+{held - before:.1f} MiB = "
                f"{(held - before) * 1024 / count:.1f} KiB per session; sessions_active {active:.0f}, "
                f"nextchar_session_state_bytes {state / 2**20:.1f} MiB = {state / count / 1024:.1f} KiB per "
                f"session); per-session bound at "
                f"the defaults (10,000 chars, 16 saved states) {bound / 1024:.1f} KiB = "
                f"{bound * count / 2**20:.0f} MiB for {count}; idle TTL {ttl:g}s evicted all within "
                f"{evicted_after:.1f}s of the last key ({left:.0f} left); RSS after {after:.1f} MiB")
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--rate", type=float, default=20.0, help="keys per second per session")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--start-chars", type=int, default=500)
    p.add_argument("--baseline-seconds", type=float, default=10.0,
                   help="PredictNext saturates the server long before the sessions' rate: a shorter run")
    p.add_argument("--baseline-start-chars", type=int, nargs="+", default=[1000, 2000],
                   help="one PredictNext run per value, its texts starting there (past 1,000 chars)")
    p.add_argument("--idle", type=int, default=1000, help="idle sessions for the memory check (0 = skip)")
    p.add_argument("--idle-ttl", type=float, default=10.0)
    p.add_argument("--repo", type=Path, default=None, help="a repo with lstm256/1 (default: export one)")
    p.add_argument("--server-flags", default="", help="extra server flags, e.g. '--session-wait-ms 2'")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3,
                   help="session and PredictNext runs alternate in this many rounds (same server), so a "
                        "change in the machine's speed hits both sides of the ratio alike")
    a = p.parse_args()
    out = [f"# bench.bench_sessions\n\ncommand: {' '.join(sys.argv)}\n\nmachine: {machine()}\n"]
    modes = ["session"] + [f"predict_next@{n}" for n in a.baseline_start_chars]
    with scratch_repo(a.repo, ("lstm",)) as repo:
        mport = free_port()
        proc, address = start_server(repo, "--max-concurrent", "256", "--metrics-port", str(mport),
                                     *shlex.split(a.server_flags))
        # per mode: [(samples, cpu s, engine calls, rows, onnxruntime s)] per round
        Round = tuple[list[tuple[int, float]], float, float, float, float]
        got: dict[str, list[Round]] = {m: [] for m in modes}
        try:
            for r in range(a.rounds):
                session_s = a.seconds / a.rounds
                runs = [("session", session_s, a.start_chars + int(a.rate * session_s) * r)]
                runs += [(f"predict_next@{n}", a.baseline_seconds / a.rounds, n)
                         for n in a.baseline_start_chars]
                for mode, seconds, start in runs:
                    before = [scrape(mport, m) for m in METRICS]
                    samples, cpu = asyncio.run(typing(address, mode, a.sessions, a.rate, seconds, start,
                                                      proc.pid))
                    after = [scrape(mport, m) for m in METRICS]
                    calls, rows, engine_s = (x - b for x, b in zip(after, before, strict=True))
                    got[mode].append((samples, cpu, calls, rows, engine_s))
                    per_key = cpu / max(1, len(samples)) * 1e3
                    print(f"round {r + 1} {mode}: {len(samples)} keys, {per_key:.3f} ms of server CPU "
                          "per key", flush=True)
        finally:
            stop_server(proc)
        per = {}
        for mode in modes:
            samples = [s for round_ in got[mode] for s in round_[0]]
            cpu, calls, rows, engine_s = (sum(round_[i] for round_ in got[mode]) for i in range(1, 5))
            seconds = a.seconds if mode == "session" else a.baseline_seconds
            start = a.start_chars if mode == "session" else int(mode.split("@")[1])
            name = f"{mode} ({a.sessions} sessions x {a.rate:g} keys/s, {seconds:g} s in {a.rounds} rounds)"
            text, per[mode] = report(name, samples, cpu, start, start + int(a.rate * seconds))
            ort_ms = engine_s / max(1, len(samples)) * 1e3
            text += (f"\n  engine calls {calls:.0f}, rows per call {rows / max(calls, 1):.2f}, onnxruntime "
                     f"wall time {ort_ms:.3f} ms per keystroke (concurrent calls share cores)")
            out.append(text)
            print(text, flush=True)

        def ratio(n: int, r: int) -> float:
            key = f"predict_next@{n}"
            pn, ses = got[key][r], got["session"][r]
            return (pn[1] / max(1, len(pn[0]))) / (ses[1] / max(1, len(ses[0])))

        out.append("server CPU per keystroke, PredictNext / Session: " + "; ".join(
            f"{per[f'predict_next@{n}'] / per['session']:.0f}x on texts past {n} chars (per round: "
            + ", ".join(f"{ratio(n, r):.0f}x" for r in range(a.rounds)) + ")"
            for n in a.baseline_start_chars))
        print(out[-1], flush=True)
        if a.idle:
            out.append(asyncio.run(idle(repo, a.idle, a.idle_ttl)))
            print(out[-1], flush=True)
    out.append(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.out is not None:
        a.out.write_text("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
