"""A corpus larger than the trainer should hold: `nextchar prepare` once, then train from the token file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from nextchar.training.tokens import open_prepared

NEXTCHAR = str(Path(sys.executable).with_name("nextchar"))
CORPUS_BYTES = 200_000_000
# Peak RSS bounds (stated in the README): prepare streams the file in 4 MiB chunks; training from the
# 400 MB token file touches only the pages it reads, so it may add little over training on a tiny corpus.
PREPARE_MAX_RSS = 200 * 2**20
TRAIN_EXTRA_RSS = 64 * 2**20


# Runs the command and prints its peak RSS. A child forked from pytest (which holds torch) would report
# pytest's RSS at the fork as its own peak (Linux carries the high-water mark across exec), so a small
# fresh interpreter starts it instead.
_MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _peak_rss(argv: list[str]) -> int:
    """Run `argv` to completion; its peak resident set size in bytes (Linux reports KiB)."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    code, kib = r.stdout.split()
    assert code == "0", r.stderr[-2000:]
    return int(kib) * 1024


def _train(corpus: Path, out: Path, val_fraction: float) -> list[str]:
    return [NEXTCHAR, "train", "--corpus", str(corpus), "--hidden", "16", "--layers", "1", "--embedding", "8",
            "--batch", "8", "--seq", "32", "--max-steps", "20", "--eval-every", "20",
            "--val-fraction", str(val_fraction), "--sample-chars", "0", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(out)]


@pytest.mark.slow  # about 15 s of CPU (a 200 MB file, two passes, two torch processes); minutes when loaded
@pytest.mark.timeout(600)
def test_a_200_mb_corpus_is_prepared_and_trained_within_bounded_memory(tmp_path: Path) -> None:
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n.,;ABCDEFGHIJ", dtype=np.uint8)
    block = alphabet[np.random.default_rng(0).integers(0, len(alphabet), 1_000_000, dtype=np.uint8)]
    big = tmp_path / "big.txt"
    with big.open("wb") as f:  # 200 rotations of a random megabyte: fast to write, never one repeated line
        for i in range(CORPUS_BYTES // block.size):
            f.write(np.roll(block, 7919 * i).tobytes())
    prepared = tmp_path / "big.tokens"
    prepare_rss = _peak_rss([NEXTCHAR, "prepare", "--corpus", str(big), "--out", str(prepared)])
    c = open_prepared(prepared)
    assert len(c.tokens) == CORPUS_BYTES and c.tokens.dtype == np.uint16
    assert len(c.vocab) == len(set(alphabet.tolist()))
    with big.open("rb") as f:
        head = f.read(1000).decode()
    assert "".join(c.vocab[t] for t in c.tokens[:1000]) == head
    assert prepare_rss < PREPARE_MAX_RSS, f"prepare peaked at {prepare_rss / 2**20:.0f} MiB"

    small = tmp_path / "small.txt"
    small.write_text(head * 20, encoding="utf-8")
    baseline = _peak_rss(_train(small, tmp_path / "small-run", 0.1))
    streamed = _peak_rss(_train(prepared, tmp_path / "big-run", 1e-4))  # 20,000 val chars
    assert (tmp_path / "big-run" / "last.pt").is_file()
    assert streamed < baseline + TRAIN_EXTRA_RSS, (
        f"training from the token file peaked at {streamed / 2**20:.0f} MiB, "
        f"{(streamed - baseline) / 2**20:.0f} MiB over the tiny corpus's {baseline / 2**20:.0f} MiB")
