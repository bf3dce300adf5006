"""The server vs the same loop in-process: one stream's chars/s; time to first char after a long prompt.

Usage: .venv/bin/python -m bench.bench_server [--chars 2000] [--prompt-chars 1000] [--repeats 15]
                                              [--batching 0|1] [--server-flags "..."]
                                              [--out bench/results/server.md]

Exports an untrained 2-layer LSTM-256 (one-hot input over the anthem's vocabulary, torch seed 0) into a
temporary repository (in a subprocess, so torch stays out of the measuring process), starts
`nextchar serve` on it as a subprocess (the server has its own process),
and measures from this process (the client) with the typed sync client. The in-process figures run
the plain per-char loop (server.engine.Engine.step + server.generation.generate, batch 1, one
onnxruntime thread) in a worker subprocess without gRPC; the server runs its defaults (K chars per
engine call). Each repeat runs the two sides back to back (alternating
which goes first) so both see the same machine load, and the ratio is the median of the per-pair ratios.
Ratios: throughput = server chars/s / in-process chars/s (want >= 1.0); time to first char =
client-measured first text of a max_new_chars=1 stream / one in-process prefill call (want <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

ROOT = Path(__file__).resolve().parent.parent
MODEL = "lstm256"
SEED = 1234


def export(repo: Path) -> None:
    """Runs in a subprocess (see main): torch must not share the measuring process's cores and threads."""
    import torch

    from nextchar.training.config import ModelConfig
    from nextchar.training.corpora import build_vocab, load_corpus
    from nextchar.training.export import export_model
    from nextchar.training.model import CharModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = build_vocab(load_corpus("anthem").text)
    model = CharModel(ModelConfig(vocab_size=len(vocab), cell="lstm", hidden_size=256, num_layers=2))
    export_model(model, vocab, repo, MODEL, version=1)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of process `pid` so far (schedstat: nanosecond resolution)."""
    return sum(common.thread_cpu(pid).values())


def start_server(repo: Path, batching: bool | None, extra: str = "") -> tuple[subprocess.Popen, str]:
    """The server's defaults (K chars per engine call), batching as told (None: the default, auto),
    plus `extra` flags."""
    flags = [] if batching is None else ["--batching", "1" if batching else "0"]
    return common.start_server(repo, *flags, *shlex.split(extra))


def prompt_text(n: int) -> str:
    from nextchar.training.corpora import load_corpus

    text = load_corpus("anthem").text
    return (text * (n // len(text) + 1))[:n]


class InProcess:
    """The in-process side in its own subprocess, driven over a pipe. In a process with a gRPC channel
    open the same loop ran measurably slower here, which would flatter the server."""

    def __init__(self, repo: Path) -> None:
        cmd = [sys.executable, "-m", "bench.bench_server", "--worker", str(repo)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def worker(repo: Path) -> None:
    """`generate N` -> 'chars_per_s cpu_s text_sha'; `prefill N` -> 'wall_s cpu_s' of one N-char prefill."""
    import hashlib

    from nextchar.server.core.artifact import load_artifact
    from nextchar.server.core.engine import Engine
    from nextchar.server.core.generation import GenerationRequest, TextChunk, generate
    from nextchar.server.core.sampling import SamplingParams

    engine = Engine.load(load_artifact(repo / MODEL / "1"), intra_op_threads=1)
    engine.warmup()
    for line in sys.stdin:
        command, n = line.split()
        if command == "generate":
            request = GenerationRequest("O say", int(n), SamplingParams(temperature=1.0), seed=SEED)
            t0, c0 = time.perf_counter(), time.process_time()
            text = "".join(e.text for e in generate(engine, request) if isinstance(e, TextChunk))
            rate, cpu = len(text) / (time.perf_counter() - t0), time.process_time() - c0
            print(rate, cpu, hashlib.sha256(text.encode()).hexdigest(), flush=True)
        else:
            ids = np.array([engine.vocab_index[c] for c in prompt_text(int(n))], dtype=np.int64)[None, :]
            t0, c0 = time.perf_counter(), time.process_time()
            engine.step(ids, engine.initial_state(1))
            print(time.perf_counter() - t0, time.process_time() - c0, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000, help="characters in the throughput stream")
    parser.add_argument("--prompt-chars", type=int, default=1000, help="prompt length for time to first char")
    parser.add_argument("--repeats", type=int, default=15, help="alternating pairs (at least 2)")
    parser.add_argument("--batching", type=int, choices=[0, 1], default=None,
                        help="run the server with --batching 0 or 1 (default: its default, auto)")
    parser.add_argument("--server-flags", default="", help="more server flags, e.g. '--max-wait-ms 0'")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--cpus", default=None,
                        help="pin the bench, the server and the in-process worker to these CPUs: '1', '0,1'")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (quartiles need two pairs), got {args.repeats}")
    if args.worker:
        worker(args.worker)
        return

    import hashlib

    from nextchar.client.client import NextCharClient

    if args.cpus:  # inherited by the subprocesses: all three sides then share the same cores
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    subprocess.run([sys.executable, "-c", f"from bench.bench_server import export; export({str(tmp)!r})"],
                   cwd=ROOT, check=True)
    local = InProcess(tmp)
    proc, address = start_server(tmp, args.batching, args.server_flags)
    long_prompt = prompt_text(args.prompt_chars)

    local_rate, server_rate, prefill, ttfc, server_ttfc, messages = [], [], [], [], [], []
    server_side_rate = []
    same_text: list[bool] = []
    # CPU seconds (all threads; server + client for the server side): unlike wall time, barely moved by
    # the other jobs on a shared machine.
    local_cpu, server_cpu, prefill_cpu, ttfc_cpu = [], [], [], []

    def both_cpu() -> float:
        return cpu_seconds(proc.pid) + time.process_time()
    try:
        with NextCharClient(address, timeout=120) as client:

            def local_generate() -> str:
                rate, cpu, sha = local.ask(f"generate {args.chars}").split()
                local_rate.append(float(rate))
                local_cpu.append(float(cpu))
                return sha

            def server_generate() -> str:
                c0, t0 = both_cpu(), time.perf_counter()
                stream = client.generate_stream(MODEL, "O say", args.chars, temperature=1.0, seed=SEED)
                pieces = list(stream)
                server_rate.append(len("".join(pieces)) / (time.perf_counter() - t0))
                server_cpu.append(both_cpu() - c0)
                server_side_rate.append(args.chars / (stream.summary.total_ms / 1e3))
                messages.append(len(pieces))
                return hashlib.sha256("".join(pieces).encode()).hexdigest()

            def local_prefill() -> None:
                wall, cpu = local.ask(f"prefill {args.prompt_chars}").split()
                prefill.append(float(wall))
                prefill_cpu.append(float(cpu))

            def server_first_char() -> None:
                c0, t0 = both_cpu(), time.perf_counter()
                stream = client.generate_stream(MODEL, long_prompt, 1)
                next(iter(stream))
                ttfc.append(time.perf_counter() - t0)
                ttfc_cpu.append(both_cpu() - c0)
                for _ in stream:
                    pass
                server_ttfc.append(stream.summary.time_to_first_char_ms / 1e3)

            for _ in range(2):  # warm both paths (first calls pay for connection setup and caches)
                client.generate(MODEL, "O say", 50)
                local.ask("generate 50")
            for i in range(args.repeats):
                # Each pair runs back to back, in alternating order, so both see the same load.
                if i % 2 == 0:
                    shas = (local_generate(), server_generate())
                    local_prefill()
                    server_first_char()
                else:
                    shas = tuple(reversed((server_generate(), local_generate())))
                    server_first_char()
                    local_prefill()
                # The in-process loop samples with server.core.sampling.sample, the server in its
                # generation graph: equal once both implement the portable sampler (SAMPLER_SPEC).
                same_text.append(shas[0] == shas[1])
    finally:
        local.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    throughput = sorted(s / lo for s, lo in zip(server_rate, local_rate, strict=True))
    first_char = sorted(t / p for t, p in zip(ttfc, prefill, strict=True))
    cpu_throughput = sorted(lo / s for lo, s in zip(local_cpu, server_cpu, strict=True))
    cpu_first_char = sorted(t / p for t, p in zip(ttfc_cpu, prefill_cpu, strict=True))

    def spread(ratios: list[float]) -> str:
        q = statistics.quantiles(ratios, n=4)
        return f"**{med(ratios):.2f}** (quartiles {q[0]:.2f}-{q[2]:.2f})"

    command = "python -m bench.bench_server " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"server defaults{'' if args.batching is None else f' with --batching {args.batching}'}"
        f"{f' and {args.server_flags}' if args.server_flags else ''}; the "
        "in-process loop is Engine.step + sample per char at batch 1, 1 onnxruntime thread; client in the "
        "bench process, server and the in-process loop each in their own subprocess; "
        f"{args.repeats} repeats, each a back-to-back pair in alternating order; ratio = median of the "
        f"per-pair ratios; pinned to CPUs {args.cpus or 'none (all)'}; load average before the run "
        f"{load_before}, after {' '.join(f'{x:.1f}' for x in os.getloadavg())}; same seeded text in "
        f"{sum(same_text)} of {len(same_text)} pairs.",
        "",
        "| measure | in-process (median) | through the server (median) | ratio | target |",
        "|---|---|---|---|---|",
        f"| one stream of {args.chars} chars (2-layer LSTM-256), chars/s | {med(local_rate):,.0f} | "
        f"{med(server_rate):,.0f} (client-side, {med(messages):.0f} messages; server-side "
        f"{med(server_side_rate):,.0f}) | {spread(throughput)} | >= 1.0 |",
        f"| time to first char, {args.prompt_chars}-char prompt, ms | {med(prefill) * 1e3:.2f} "
        f"(one prefill call) | {med(ttfc) * 1e3:.2f} (client-side; server-side "
        f"{med(server_ttfc) * 1e3:.2f}) | {spread(first_char)} | <= 1.2 |",
        f"| the same stream, CPU seconds (server + client process) | {med(local_cpu):.3f} | "
        f"{med(server_cpu):.3f} | {spread(cpu_throughput)} (in-process CPU / server CPU) | |",
        f"| the same first char, CPU ms (server + client process) | {med(prefill_cpu) * 1e3:.2f} | "
        f"{med(ttfc_cpu) * 1e3:.2f} | {spread(cpu_first_char)} | |",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
