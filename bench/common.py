"""Shared bench helpers: untrained exports (in a torch subprocess), a server subprocess, timing, machine."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("lstm", "gru", "rnn")
# The tinyshakespeare character set (65 chars), for figures comparable with issue 10's; no download.
SHAKESPEARE_VOCAB = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def export_untrained(repo: Path, cells: Sequence[str] = CELLS, hidden: int = 256, layers: int = 2, *,
                     bare_names: bool = False, int8: bool = False, shakespeare: bool = False) -> Path:
    """Export untrained 2-layer one-hot models over the anthem vocabulary as `<repo>/<cell>256/1`
    (`<repo>/<cell>/1` with bare_names; plus model.int8.onnx with int8).

    Runs in a subprocess so torch never shares the measuring process (its threads, its memory);
    untrained weights cost the same per step as trained ones. `shakespeare`: SHAKESPEARE_VOCAB instead.
    """
    cmd = [sys.executable, "-m", "bench.common", "export", str(repo), "--hidden", str(hidden),
           "--layers", str(layers), *cells, *(["--bare-names"] if bare_names else []),
           *(["--int8"] if int8 else []), *(["--shakespeare"] if shakespeare else [])]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return repo


@contextlib.contextmanager
def scratch_repo(repo: Path | None, cells: Sequence[str] = CELLS) -> Iterator[Path]:
    """`repo` as given, or a fresh untrained export of `cells` that is deleted afterwards."""
    if repo is not None:
        yield repo
        return
    with tempfile.TemporaryDirectory(prefix="bench-") as d:
        yield export_untrained(Path(d), cells)


def model_name(cell: str, hidden: int = 256) -> str:
    return f"{cell}{hidden}"


def _export(repo: Path, cells: Sequence[str], hidden: int, layers: int, bare_names: bool, int8: bool,
            shakespeare: bool = False) -> None:
    import torch

    from nextchar.training.config import ModelConfig
    from nextchar.training.corpora import build_vocab, load_corpus
    from nextchar.training.export import export_model
    from nextchar.training.model import CharModel

    torch.set_num_threads(1)
    vocab = SHAKESPEARE_VOCAB if shakespeare else build_vocab(load_corpus("anthem").text)
    for cell in cells:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=len(vocab), cell=cell, hidden_size=hidden, num_layers=layers)
        name = cell if bare_names else model_name(cell, hidden)
        export_model(CharModel(config), vocab, repo, name, version=1, int8=int8)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far, all its threads (/proc/PID/stat utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of process `pid`'s threads by group (schedstat: nanosecond resolution):
    "loop" (the main thread: the server's event loop, gRPC's Python side), "python" (threads Python
    started: the batchers, the session workers, grpc's poller) and "grpc" (gRPC core's own threads).
    A thread that ended is no longer counted: compare snapshots of a steady server."""
    out = {"loop": 0.0, "python": 0.0, "grpc": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            name = (task / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
        group = "loop" if task.name == str(pid) else "python" if name.startswith("python") else "grpc"
        out[group] += seconds
    return out


def load_engine(repo: Path, name: str, threads: int = 1):
    """The server's Engine for `<repo>/<name>/1`, warmed up, with `threads` intra-op threads."""
    from nextchar.server.core.artifact import load_artifact
    from nextchar.server.core.engine import Engine

    engine = Engine.load(load_artifact(repo / name / "1"), intra_op_threads=threads)
    engine.warmup()
    return engine


def generation_args(engine, rows: int, k: int, temperature: float = 0.8) -> tuple:
    """`engine.generate`'s arguments for `rows` rows x `k` chars from the zero state: token 0, seeded
    uniforms, `temperature`, no top-k (int64 zeros, a row may be changed after) and no top-p."""
    import numpy as np

    return (np.zeros((rows, 1), np.int64), engine.initial_state(rows), *_sampling(rows, k, temperature))


def generation_feed(input_names: Sequence[str], layers: int, hidden: int, rows: int, k: int) -> dict:
    """The same as a feed for a generation-graph session, by its input names in order (tokens, the
    state inputs, u, temperature, top_k, top_p): for benches that run the graph without an Engine."""
    import numpy as np

    state = [np.zeros((layers, rows, hidden), np.float32) for _ in input_names[1:-4]]
    values = (np.zeros((rows, 1), np.int64), *state, *_sampling(rows, k, 0.8))
    return dict(zip(input_names, values, strict=True))


def _sampling(rows: int, k: int, temperature: float) -> tuple:
    """u (seeded uniforms), temperature, top_k (off), top_p (off) for `rows` rows x `k` chars."""
    import numpy as np

    return (np.random.default_rng(0).random((rows, k)), np.full(rows, temperature), np.zeros(rows, np.int64),
            np.ones(rows))


def prompt_text(n: int) -> str:
    """`n` characters of the anthem, repeated as needed (every char is in the models' vocabulary)."""
    from nextchar.training.corpora import load_corpus

    text = load_corpus("anthem").text
    return (text * (n // len(text) + 1))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, *flags: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`nextchar serve` on 127.0.0.1 in its own process; returns once health says SERVING."""
    from nextchar.client.client import NextCharClient
    from nextchar.client.errors import NextCharError

    port = free_port()
    cmd = [sys.executable, "-m", "nextchar.client.cli", "serve", "--model-repo", str(repo),
           "--host", "127.0.0.1", "--port", str(port), "--admin-address", "127.0.0.1:0",
           "--log-level", "WARNING", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with NextCharClient(address, timeout=2) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    return proc, address
            except NextCharError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"the server ({' '.join(flags)}) did not become SERVING")
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def best_of(fn: Callable[[], object], repeats: int, min_s: float = 0.05) -> float:
    """Fastest seconds per call of `fn` over `repeats` rounds of >= min_s each (calls per round adapt).

    The minimum, not the median: on a shared machine other jobs only ever add time, so the fastest
    round is the closest to what the code itself costs (the ceiling these benches report)."""
    fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_s:
            break
        calls *= 2
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls)
    return min(rounds)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """One line: CPUs, CPU model, memory, load, and the versions that matter for these figures."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                          if x.startswith("MemTotal")).split()[1])
        mem = f"{mem_kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = "unknown memory"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    versions = ", ".join(f"{d} {_version(d)}" for d in ("onnxruntime", "numpy", "grpcio", "torch"))
    return (f"{os.cpu_count()} CPUs ({model}), {mem}; Python {platform.python_version()}, {versions}; "
            f"load average {load}")


def main() -> None:
    p = argparse.ArgumentParser(description="bench helper subprocess entry points")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("repo", type=Path)
    e.add_argument("cells", nargs="+")
    e.add_argument("--hidden", type=int, default=256)
    e.add_argument("--layers", type=int, default=2)
    e.add_argument("--bare-names", action="store_true", help="name models <cell> rather than <cell><hidden>")
    e.add_argument("--int8", action="store_true", help="also export the dynamically quantized variant")
    e.add_argument("--shakespeare", action="store_true", help="the tinyshakespeare vocabulary (65 chars)")
    a = p.parse_args()
    _export(a.repo, a.cells, a.hidden, a.layers, a.bare_names, a.int8, a.shakespeare)


if __name__ == "__main__":
    main()
