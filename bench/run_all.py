"""`make bench`: every benchmark in its own process, one after another; each one's output saved under --out.

Usage: .venv/bin/python -m bench.run_all [--out bench/results/suite] [--only engine concurrent ...]
                                         [--wait-for-idle-s 0]

Benches (each prints ratios measured in its own run): engine (onnxruntime step by batch), teaching
(re-run growing text vs carried state), torch_vs_ort, server (bench.bench_server: one stream, TTFC),
concurrent (64 streams of 400 chars through the server vs the plain 64-row onnxruntime loop at its best
thread count, LSTM/GRU/RNN-256), cancel (cancel latency while 64 streams run), ttfc (time
to first char vs prompt length), train (bench.bench_train), batch_invariance (bench.batch_invariance
on untrained fp32+int8 exports), ops (bench.bench_ops: the operations layer's cost on one stream).
Each runs as a subprocess so torch, gRPC channels and onnxruntime
thread pools of one bench never share a process with another's measurements.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, export_untrained, machine


def benches(repo: Path, invariance_repo: Path) -> dict[str, list[str]]:
    r = str(repo)
    return {
        "engine": ["bench.bench_engine", "--repo", r],
        "teaching": ["bench.bench_teaching", "--repo", r],
        "torch_vs_ort": ["bench.bench_torch_vs_ort"],
        "server": ["bench.bench_server"],
        "concurrent": ["bench.bench_concurrent"],  # its own exports: the tinyshakespeare charset
        "cancel": ["bench.bench_cancel"],
        "ttfc": ["bench.bench_ttfc", "--repo", r],
        "train": ["bench.bench_train"],
        "batch_invariance": ["bench.batch_invariance", "--repo", str(invariance_repo), "--rounds", "1"],
        "ops": ["bench.bench_ops", str(invariance_repo), "--model", "lstm"],
    }


def training_running() -> bool:
    """Is a `nextchar train` process running on this machine (it would distort every figure)?"""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any("nextchar train" in line and "ps -eo" not in line for line in out.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "suite")
    p.add_argument("--only", nargs="+", default=None, help="run only these benches (names as listed above)")
    p.add_argument("--wait-for-idle-s", type=float, default=0.0,
                   help="first wait up to this long for running `nextchar train` jobs to end")
    a = p.parse_args()
    names = sorted(benches(Path(), Path()))
    unknown = set(a.only or ()) - set(names)
    if unknown:
        raise SystemExit(f"--only: unknown bench(es) {sorted(unknown)}; choose from {names}")
    deadline = time.monotonic() + a.wait_for_idle_s
    while training_running() and time.monotonic() < deadline:
        time.sleep(10)
    if training_running():
        print("warning: a `nextchar train` process is running; figures will be distorted", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as d:
        run_benches(a, Path(d))


def run_benches(a: argparse.Namespace, tmp: Path) -> None:
    repo = export_untrained(tmp / "repo")
    invariance_repo = export_untrained(tmp / "invariance", bare_names=True, int8=True)
    a.out.mkdir(parents=True, exist_ok=True)
    chosen = benches(repo, invariance_repo)
    print(f"Machine: {machine()}", flush=True)
    failed = []
    for name, args in chosen.items():
        if a.only and name not in a.only:
            continue
        command = [sys.executable, "-m", *args]
        print(f"\n## {name}: python -m {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        print(run.stdout, end="", flush=True)
        took = time.perf_counter() - t0
        header = f"<!-- python -m {' '.join(args)} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        (a.out / f"{name}.md").write_text(f"{header}{took:.0f} s, exit {run.returncode}) -->\n{run.stdout}")
        if run.returncode:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
