"""Data parallel through torchrun: 2 CPU processes under gloo match one process with the same global batch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from nextchar.server.core.artifact import load_artifact  # noqa: E402
from nextchar.training.checkpoint import load_checkpoint  # noqa: E402

NEXTCHAR = str(Path(sys.executable).with_name("nextchar"))
# Dropout 0, so the only difference between the runs is the order of floating-point sums (the gradient
# all-reduce); measured: at most 7e-8 nats apart over 30 steps.
TOLERANCE = 1e-4


def _flags(corpus: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--corpus", str(corpus), "--cell", "lstm", "--hidden", "16", "--layers", "2",
            "--embedding", "8", "--dropout", "0", "--batch", "8", "--seq", "16", "--lr", "1e-2",
            "--schedule", "constant", "--max-steps", str(steps), "--eval-every", "10", "--patience", "0",
            "--sample-chars", "8", "--device", "cpu", "--threads", "1", "--no-progress", "--out", str(out),
            "--ema", "0.9"]  # the weight average too: each process keeps it, rank 0 evaluates and writes it


def _run(argv: list[str], procs: int = 1) -> None:
    if procs > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                NEXTCHAR, *argv]
    else:
        argv = [NEXTCHAR, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                       env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)})
    assert r.returncode == 0, r.stderr[-3000:]


def _curve(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]


def _logits(version_dir: Path) -> np.ndarray:
    a = load_artifact(version_dir)
    sess = ort.InferenceSession(str(a.model_path), providers=["CPUExecutionProvider"])
    zeros = np.zeros((2, 1, 16), np.float32)
    return sess.run(["logits"], {"tokens": np.array([[1, 2, 3, 4]]), "h0": zeros, "c0": zeros})[0]


def test_two_gloo_processes_match_one_and_resume(tmp_path: Path) -> None:
    r = random.Random(0)
    words = ["rose", "thorn", "crown", "sword", "king", "queen", "night", "day", "love", "death"]
    corpus = tmp_path / "verse.txt"
    corpus.write_text(" ".join(r.choice(words) for _ in range(3000)), encoding="utf-8")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run(_flags(corpus, single, 30))
    _run(_flags(corpus, ddp, 20), procs=2)  # stops at 20; then resumed to 30 by two processes
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "last.pt", "loss.png", "metrics.csv",
                                                    "metrics.jsonl"]  # one writer: no per-rank files
    _run([*_flags(corpus, ddp, 30), "--resume"], procs=2)

    one, two = _curve(single), _curve(ddp)
    assert [s for s, _, _ in one] == [s for s, _, _ in two] == [10, 20, 30]
    for (_, train1, val1), (_, train2, val2) in zip(one, two, strict=True):
        assert abs(train1 - train2) <= TOLERANCE and abs(val1 - val2) <= TOLERANCE
    assert one[-1][2] < one[0][2]  # it learned something, so the comparison means something
    ckpt = load_checkpoint(ddp / "last.pt")
    assert ckpt.step == 30 and [h.shape for h in ckpt.hidden] == [(2, 8, 16)] * 2  # all 8 streams
    single_ckpt = load_checkpoint(single / "last.pt")
    for k, v in single_ckpt.model_state.items():  # the averages agree as the curves do
        assert float((v - ckpt.model_state[k]).abs().max()) <= 1e-3
    assert ckpt.train_state.keys() == ckpt.model_state.keys()

    repo = tmp_path / "repo"
    _run(["export", "--checkpoint", str(single / "last.pt"), "--repo", str(repo), "--name", "one"])
    _run(["export", "--checkpoint", str(ddp / "last.pt"), "--repo", str(repo), "--name", "two"])
    a, b = load_artifact(repo / "one" / "1").manifest, load_artifact(repo / "two" / "1").manifest
    assert a.architecture == b.architecture and a.vocab == b.vocab
    assert np.max(np.abs(_logits(repo / "one" / "1") - _logits(repo / "two" / "1"))) <= 1e-3


def test_a_resumed_run_with_dropout_continues_every_process_exactly(tmp_path: Path) -> None:
    """Every process's dropout stream is saved and restored (only rank 0's was: the others were
    reseeded on resume, so a resumed run with dropout ended with other weights than an uninterrupted
    one). Two processes both ways, so the sums are the same and the weights must agree exactly."""
    r = random.Random(1)
    corpus = tmp_path / "verse.txt"
    corpus.write_text(" ".join(r.choice(["rose", "thorn", "crown", "night"]) for _ in range(2000)),
                      encoding="utf-8")

    def flags(out: Path, steps: int) -> list[str]:
        argv = _flags(corpus, out, steps)
        argv[argv.index("--dropout") + 1] = "0.3"
        return argv

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(flags(straight, 30), procs=2)
    _run(flags(resumed, 20), procs=2)
    _run([*flags(resumed, 30), "--resume"], procs=2)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for k, v in a.train_state.items():
        assert torch.equal(v, b.train_state[k]), k
