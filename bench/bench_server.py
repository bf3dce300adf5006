"""The server vs the same loop in-process: one stream's chars/s; time to first char after a long prompt.

Usage: .venv/bin/python -m bench.bench_server [--chars 2000] [--prompt-chars 1000] [--repeats 7] [--batching]
                                              [--out bench/results/server.md]

Exports an untrained 2-layer LSTM-256 (one-hot input over the anthem's vocabulary, torch seed 0) into a
temporary repository (in a subprocess, so torch stays out of the measuring process), starts
`nextchar serve` on it as a subprocess (the server has its own process),
and measures from this process (the client) with the typed sync client. The in-process figures run
the very loop the server runs (server.engine.Engine + server.generation.generate, one onnxruntime
thread) in a worker subprocess without gRPC, interleaved with the server runs so both see the same
machine load; medians.
Ratios: throughput = server chars/s / in-process chars/s (want >= 0.8); time to first char =
client-measured first text of a max_new_chars=1 stream / one in-process prefill call (want <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, batching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "nextchar.client.cli", "serve", "--model-repo", str(repo),
           "--host", "127.0.0.1", "--port", str(port), "--intra-op-threads", "1",
           "--batching", "1" if batching else "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    from nextchar.client.client import NextCharClient
    from nextchar.client.errors import NextCharError

    deadline = time.monotonic() + 120
    with NextCharClient(address, timeout=2) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    return proc, address
            except NextCharError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the server did not become SERVING")
            time.sleep(0.1)


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
    """`generate N` -> 'chars_per_s text_sha'; `prefill N` -> seconds of one prefill on N prompt chars."""
    import hashlib

    from nextchar.server.artifact import load_artifact
    from nextchar.server.engine import Engine
    from nextchar.server.generation import GenerationRequest, TextChunk, generate
    from nextchar.server.sampling import SamplingParams

    engine = Engine.load(load_artifact(repo / MODEL / "1"), intra_op_threads=1)
    engine.warmup()
    for line in sys.stdin:
        command, n = line.split()
        if command == "generate":
            request = GenerationRequest("O say", int(n), SamplingParams(temperature=1.0), seed=SEED)
            t0 = time.perf_counter()
            text = "".join(e.text for e in generate(engine, request) if isinstance(e, TextChunk))
            rate = len(text) / (time.perf_counter() - t0)
            print(rate, hashlib.sha256(text.encode()).hexdigest(), flush=True)
        else:
            ids = np.array([engine.vocab_index[c] for c in prompt_text(int(n))], dtype=np.int64)[None, :]
            t0 = time.perf_counter()
            engine.step(ids, engine.initial_state(1))
            print(time.perf_counter() - t0, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000, help="characters in the throughput stream")
    parser.add_argument("--prompt-chars", type=int, default=1000, help="prompt length for time to first char")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batching", action="store_true", help="run the server with --batching 1")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--cpus", default=None,
                        help="pin the bench, the server and the in-process worker to these CPUs: '1', '0,1'")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
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
    proc, address = start_server(tmp, args.batching)
    long_prompt = prompt_text(args.prompt_chars)

    local_rate, server_rate, prefill, ttfc, server_ttfc, messages = [], [], [], [], [], []
    server_side_rate = []
    try:
        with NextCharClient(address, timeout=120) as client:
            for _ in range(2):  # warm both paths (first calls pay for connection setup and caches)
                client.generate(MODEL, "O say", 50)
                local.ask("generate 50")
            for _ in range(args.repeats):
                rate, local_sha = local.ask(f"generate {args.chars}").split()
                local_rate.append(float(rate))

                t0 = time.perf_counter()
                stream = client.generate_stream(MODEL, "O say", args.chars, temperature=1.0, seed=SEED)
                pieces = list(stream)
                server_rate.append(len("".join(pieces)) / (time.perf_counter() - t0))
                server_side_rate.append(args.chars / (stream.summary.total_ms / 1e3))
                messages.append(len(pieces))
                if hashlib.sha256("".join(pieces).encode()).hexdigest() != local_sha:
                    raise SystemExit("server and in-process texts differ for the same seed")

                prefill.append(float(local.ask(f"prefill {args.prompt_chars}")))

                t0 = time.perf_counter()
                stream = client.generate_stream(MODEL, long_prompt, 1)
                next(iter(stream))
                ttfc.append(time.perf_counter() - t0)
                for _ in stream:
                    pass
                server_ttfc.append(stream.summary.time_to_first_char_ms / 1e3)
    finally:
        local.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    med = statistics.median
    throughput_ratio = med(server_rate) / med(local_rate)
    ttfc_ratio = med(ttfc) / med(prefill)
    command = "python -m bench.bench_server " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"server {'with' if args.batching else 'without'} batching, 1 onnxruntime thread; client in the "
        "bench process, server and the in-process loop each in their own subprocess; medians of "
        f"{args.repeats} interleaved repeats; pinned to CPUs {args.cpus or 'none (all)'}; load average "
        f"before the run {load_before}.",
        "",
        "| measure | in-process | through the server | ratio | target |",
        "|---|---|---|---|---|",
        f"| one stream of {args.chars} chars (2-layer LSTM-256), chars/s | {med(local_rate):,.0f} | "
        f"{med(server_rate):,.0f} (client-side, {med(messages):.0f} messages; server-side "
        f"{med(server_side_rate):,.0f}) | {throughput_ratio:.2f} | >= 0.8 |",
        f"| time to first char, {args.prompt_chars}-char prompt, ms | {med(prefill) * 1e3:.2f} "
        f"(one prefill call) | {med(ttfc) * 1e3:.2f} (client-side; server-side "
        f"{med(server_ttfc) * 1e3:.2f}) | {ttfc_ratio:.2f} | <= 1.2 |",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
