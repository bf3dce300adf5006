"""nextchar's server side by side with a Triton Python-backend peer on the same models (issue 10).

Usage: .venv/bin/python -m bench.bench_triton [--cells lstm gru rnn] [--rounds 5] [--streams 64]
           [--chars 400] [--single-chars 2000] [--triton-threads 1 2] [--triton-venv DIR] [--out FILE]

Models: untrained 2-layer 256-unit exports over the tinyshakespeare character set (65 chars), as
bench_concurrent. nextchar: `nextchar serve` with its defaults (plus --max-concurrent above the stream
count). Triton: the tritonserver that PyPI's nvidia-pytriton bundles (a separate venv: tritonclient pins
protobuf<7), decoupled Python-backend models (bench/triton/model.py: execute() only queues; one engine
thread steps every active stream in one onnxruntime call per char over the same model.onnx, samples
with nextchar's own seeded rule, flushes by nextchar's rule), one per cell and --triton-threads value
(onnxruntime intra-op threads: 2 lets one call use both cores but waits on a second busy core under
load; the faster variant of each round counts). Load: `streams` concurrent streams x `chars` chars,
then 1 stream x `single_chars` chars; temperature 0.8, stream i seeded i (1-based), the same seeds every
round. nextchar's clients run in this process (its asyncio client), Triton's in a triton-venv worker
process (tritonclient.grpc.aio, one ModelStreamInfer call per stream). Rounds interleave the setups,
rotating which goes first. Server CPU in cores: utime + stime of the server and its children (Triton's
Python stubs are child processes) over the run / wall time. Every text is compared with nextchar's for
the same seed and prompt; the count that differ is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    ROOT,
    cpu_seconds,
    export_untrained,
    free_port,
    machine,
    model_name,
    start_server,
    stop_server,
)

PROMPTS = ("O say can you see", "What so proudly we hailed", "And the rockets red glare", "O")
TEMPERATURE = 0.8
HERE = Path(__file__).resolve().parent / "triton"


@dataclass
class Run:
    chars_per_s: float
    cores: float
    texts: list[str]
    messages: int  # streamed messages that carried text, all streams

    @property
    def chars_per_message(self) -> float:
        return sum(map(len, self.texts)) / max(1, self.messages)


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of `pid` and of its live children (Triton runs one Python stub process per model)."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return total


def triton_name(cell: str, threads: int) -> str:
    """The Triton model of `cell` whose onnxruntime session runs `threads` intra-op threads."""
    return f"{model_name(cell)}_t{threads}"


# ------------------------------------------------------------------------------------------------
# Triton: a model repository and a backend directory in a temp dir, tritonserver, a client worker.

def _venv_python(venv: Path) -> tuple[Path, str, str, str]:
    """(python, its version "3.11", its lib dir, its site-packages) of the triton venv."""
    python = venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", "import sys, sysconfig; print(f'{sys.version_info[0]}."
                          "{sys.version_info[1]}'); print(sysconfig.get_config_var('LIBDIR')); "
                          "print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.split("\n")
    return python, out[0], out[1], out[2]


class Triton:
    """tritonserver over `repo`'s exports of `cells`, and a client worker process talking to it."""

    def __init__(self, venv: Path, repo: Path, cells: list[str], threads: list[int], work: Path) -> None:
        python, version, libdir, site = _venv_python(venv)
        dist = Path(site) / "pytriton" / "tritonserver"
        if not dist.is_dir():
            raise SystemExit(f"no tritonserver under {dist}: pip install nvidia-pytriton into {venv}")
        backends, models = work / "backends", work / "models"
        shutil.copytree(dist / "backends", backends)
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy(stub, backends / "python")
        template = (HERE / "config.pbtxt").read_text().split("\n", 1)[1]  # line 1 is a comment
        names = [(cell, n, triton_name(cell, n)) for cell in cells for n in threads]
        for cell, n, name in names:
            (models / name / "1").mkdir(parents=True)
            shutil.copy(HERE / "model.py", models / name / "1" / "model.py")
            (models / name / "config.pbtxt").write_text(template.format(
                name=name, model_dir=repo / model_name(cell) / "1", repo_root=ROOT, intra_op_threads=n))
        env = dict(os.environ)
        # The stub links libpython3.X.so: the venv interpreter's own lib dir first, so that it gets the
        # library of the interpreter whose site-packages it imports, not a system copy of another 3.X.
        env["LD_LIBRARY_PATH"] = ":".join(x for x in (libdir, str(Path(site) / "nvidia_pytriton.libs"),
                                                       env.get("LD_LIBRARY_PATH")) if x)
        env["PYTHONPATH"] = site  # the stub's numpy and onnxruntime
        env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.log = work / "tritonserver.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(dist / "bin" / "tritonserver"), "--model-repository", str(models),
                 "--backend-directory", str(backends), "--grpc-address", "127.0.0.1",
                 "--grpc-port", str(port),
                 "--allow-http", "false", "--allow-metrics", "false", "--exit-timeout-secs", "5"],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.client = subprocess.Popen([str(python), str(HERE / "client.py"), self.address],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        models_ready = {"ready": [name for _, _, name in names]}
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = self.log.read_text()[-3000:]
                raise SystemExit(f"tritonserver did not become ready; its log:\n{tail}")
            if self._ask(models_ready)["ready"]:
                return
            time.sleep(0.2)

    def _ask(self, job: dict) -> dict:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(json.dumps(job) + "\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        if not line:
            raise SystemExit(f"the Triton client worker died; server log:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, model: str, prompts: list[str], chars: int, seeds: list[int]) -> Run:
        cpu0 = tree_cpu_seconds(self.proc.pid)
        r = self._ask({"model": model, "prompts": prompts, "chars": chars, "temperature": TEMPERATURE,
                       "seeds": seeds})
        cpu = tree_cpu_seconds(self.proc.pid) - cpu0
        return Run(sum(map(len, r["texts"])) / r["wall"], cpu / r["wall"], r["texts"], r["messages"])

    def close(self) -> None:
        if self.client.stdin:
            self.client.stdin.close()
        self.client.wait(30)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------
# nextchar: its asyncio client, one GenerateStream call per stream on one channel.

async def _nextchar(address: str, model: str, prompts: list[str], chars: int, seeds: list[int]) -> tuple:
    from nextchar.client.client import AsyncNextCharClient

    async def one(c: AsyncNextCharClient, prompt: str, seed: int) -> list[str]:
        stream = c.generate_stream(model, prompt, chars, temperature=TEMPERATURE, seed=seed)
        return [text async for text in stream]

    async with AsyncNextCharClient(address, timeout=600) as c:
        await c.health()
        t0 = time.perf_counter()
        pieces = await asyncio.gather(*(one(c, p, s) for p, s in zip(prompts, seeds, strict=True)))
        return pieces, time.perf_counter() - t0


def nextchar_run(proc: subprocess.Popen, address: str, model: str, prompts: list[str], chars: int,
                 seeds: list[int]) -> Run:
    cpu0 = tree_cpu_seconds(proc.pid)
    pieces, wall = asyncio.run(_nextchar(address, model, prompts, chars, seeds))
    texts = ["".join(p) for p in pieces]
    return Run(sum(map(len, texts)) / wall, (tree_cpu_seconds(proc.pid) - cpu0) / wall, texts,
               sum(map(len, pieces)))


# ------------------------------------------------------------------------------------------------

def measure(a: argparse.Namespace, repo: Path, work: Path) -> dict[tuple[str, int], dict[str, list[Run]]]:
    """{(cell, streams): {"nextchar": [Run per round], "triton 1t": [...], ...}} for both loads, all cells."""
    loads = [(a.streams, a.chars), (1, a.single_chars)]
    proc, address = start_server(repo, "--max-concurrent", str(max(64, 2 * a.streams)))
    triton = None
    try:
        triton = Triton(a.triton_venv, repo, a.cells, a.triton_threads, work)
        setups: dict[str, Callable[..., Run]] = {"nextchar": lambda m, *x: nextchar_run(proc, address, m, *x)}
        for n in a.triton_threads:
            setups[f"triton {n}t"] = lambda m, *x, n=n: triton.run(f"{m}_t{n}", *x)
        runs: dict[tuple[str, int], dict[str, list[Run]]] = {}
        for cell in a.cells:
            model = model_name(cell)
            for fn in setups.values():  # warm-up: sessions, threads, channels
                fn(model, list(PROMPTS), 20, [10_000 + i for i in range(len(PROMPTS))])
            for r in range(a.rounds):
                order = list(setups)[r % len(setups):] + list(setups)[:r % len(setups)]  # rotate
                for streams, chars in loads:
                    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
                    seeds = list(range(1, streams + 1))
                    cell_runs = runs.setdefault((cell, streams), {k: [] for k in setups})
                    for name in order:
                        cell_runs[name].append(setups[name](model, prompts, chars, seeds))
                    print(f"{cell} round {r + 1} x{streams}: " + ", ".join(
                        f"{k} {v[-1].chars_per_s:,.0f} chars/s" for k, v in cell_runs.items()), flush=True)
        return runs
    finally:
        if triton is not None:
            triton.close()
        stop_server(proc)


def report(runs: dict[tuple[str, int], dict[str, list[Run]]], a: argparse.Namespace) -> list[str]:
    med, nan = statistics.median, math.nan
    variants = [f"triton {n}t" for n in a.triton_threads]
    lines = [
        f"Loads: {a.streams} concurrent streams x {a.chars} chars, and 1 stream x {a.single_chars} chars; "
        f"2-layer 256-unit untrained models, tinyshakespeare vocab (65), temperature {TEMPERATURE}, stream i "
        f"seeded i. {a.rounds} interleaved rounds. Triton Nt: the peer with N onnxruntime intra-op threads; "
        "'best Triton' is the faster variant in each round. chars/s and CPU cores are medians; a ratio is "
        "the median of per-round ratios (per-round values in brackets).", "",
        "| cell | streams | nextchar chars/s | " + " | ".join(f"{v} chars/s" for v in variants)
        + " | nextchar / best Triton | CPU cores: nextchar / " + " / ".join(variants)
        + " | per CPU-second: nextchar / best Triton | chars/message: nextchar / best Triton "
        "| texts differing from nextchar's |",
        "|---|---|---|" + "---|" * len(variants) + "---|---|---|---|---|",
    ]
    for (cell, streams), r in runs.items():
        n = r["nextchar"]
        best = [max((r[v][i] for v in variants), key=lambda x: x.chars_per_s) for i in range(len(n))]
        ratios = [x.chars_per_s / y.chars_per_s for x, y in zip(n, best, strict=True)]
        per_cpu = [(x.chars_per_s / x.cores) / (y.chars_per_s / y.cores) if x.cores and y.cores else nan
                   for x, y in zip(n, best, strict=True)]  # 0 cores: a run shorter than a clock tick
        differ = sum(x != y for v in variants for xr, yr in zip(n, r[v], strict=True)
                     for x, y in zip(xr.texts, yr.texts, strict=True))
        total = sum(len(x.texts) for x in n) * len(variants)
        cores = " / ".join(f"{med(x.cores for x in r[k]):.2f}" for k in ("nextchar", *variants))
        lines.append(
            f"| {cell} | {streams} | {med(x.chars_per_s for x in n):,.0f} | "
            + " | ".join(f"{med(y.chars_per_s for y in r[v]):,.0f}" for v in variants)
            + f" | **{med(ratios):.2f}x** ({', '.join(f'{x:.2f}' for x in ratios)}) | {cores} "
            f"| {med(per_cpu):.2f} "
            f"| {med(x.chars_per_message for x in n):.1f} / {med(y.chars_per_message for y in best):.1f} "
            f"| {differ} of {total} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chars", type=int, default=400)
    p.add_argument("--single-chars", type=int, default=2000)
    p.add_argument("--triton-venv", type=Path,
                   default=Path(os.environ.get("TRITON_VENV", "/work/triton-venv")),
                   help="a venv with nvidia-pytriton, tritonclient[grpc], onnxruntime, numpy")
    p.add_argument("--triton-threads", type=int, nargs="+", default=[1, 2],
                   help="one Triton variant per value: onnxruntime intra-op threads of its engine")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as d:
        repo = export_untrained(Path(d) / "repo", a.cells, shakespeare=True)
        before = machine()
        runs = measure(a, repo, Path(d) / "triton")
    _, version, _, site = _venv_python(a.triton_venv)
    command = "python -m bench.bench_triton " + " ".join(sys.argv[1:])
    text = "\n".join([f"Command: `{command}`", f"Machine before: {before}", f"Machine after: {machine()}",
                      f"Triton: tritonserver from nvidia-pytriton ({site}), Python backend stub {version}; "
                      f"this process: Python {sysconfig.get_python_version()}", "", *report(runs, a)])
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
