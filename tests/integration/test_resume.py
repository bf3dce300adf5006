"""A training process killed with SIGKILL and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nextchar.training.checkpoint import load_checkpoint  # noqa: E402

CLI = [sys.executable, "-m", "nextchar.client.cli"]
KILL_WAIT_S = 180  # bound on waiting for the first checkpoint on a slow, shared machine


def train_args(corpus: Path, out: Path) -> list[str]:
    # dropout and a cosine schedule with warmup, so the RNG and scheduler state must survive the kill
    return [*CLI, "train", "--corpus", str(corpus), "--cell", "lstm", "--hidden", "24", "--layers", "2",
            "--embedding", "8", "--dropout", "0.3", "--batch", "8", "--seq", "16", "--lr", "3e-3",
            "--schedule", "cosine", "--warmup", "10", "--max-steps", "120", "--eval-every", "20",
            "--patience", "0", "--sample-chars", "8", "--seed", "5", "--threads", "1", "--no-progress",
            "--out", str(out)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    r = random.Random(1)
    words = ["wind", "rain", "sun", "snow", "cloud", "storm", "fog", "mist", "hail", "frost"]
    path = tmp_path / "weather.txt"
    path.write_text(" ".join(r.choice(words) for _ in range(1500)), encoding="utf-8")
    return path


def test_sigkill_then_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    victim = subprocess.Popen(train_args(corpus, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while not (b / "last.pt").exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (b / "last.pt").exists(), "no checkpoint appeared"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_checkpoint(b / "last.pt").step
    assert 0 < killed_at < 120

    resumed = subprocess.run([*train_args(corpus, b), "--resume"], capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {b / 'last.pt'} at step {killed_at}" in resumed.stdout
    whole = subprocess.run(train_args(corpus, a), capture_output=True, text=True, timeout=240)
    assert whole.returncode == 0, whole.stderr

    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca.step == cb.step == 120
    diff = max(float((ca.model_state[k] - cb.model_state[k]).abs().max()) for k in ca.model_state)
    assert diff <= 1e-6
    # the metrics files hold each evaluation once, with the same losses
    def losses(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]
    assert losses(a) == losses(b)
    assert [r[0] for r in losses(b)] == list(range(20, 121, 20))


def _small(corpus: Path, **overrides):
    from nextchar.training.config import TrainConfig

    settings = dict(corpus=str(corpus), hidden_size=24, num_layers=1, embedding_dim=8, batch_size=8,
                    seq_len=12, lr=3e-3, max_steps=40, eval_every=20, patience=0, sample_chars=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def test_a_kill_between_the_checkpoint_writes_leaves_best_pt_right_after_resume(corpus: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    """Interrupted after one checkpoint of an improving evaluation and before the other: once resumed,
    best.pt holds the model of the best val that last.pt records (it kept an older one for good when
    last.pt was written first)."""
    import nextchar.training.train as t

    real = t.save_checkpoint

    def interrupted(path, ckpt):  # the second write of step 40 never happens
        if ckpt.step == 40 and (path.parent / f".wrote-{ckpt.step}").exists():
            raise KeyboardInterrupt
        real(path, ckpt)
        if ckpt.step == 40:
            (path.parent / f".wrote-{ckpt.step}").touch()

    config = _small(corpus)
    monkeypatch.setattr(t, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        t.train(config, tmp_path / "run", progress=False, log=lambda line: None)
    monkeypatch.setattr(t, "save_checkpoint", real)
    t.train(config, tmp_path / "run", resume=True, progress=False, log=lambda line: None)
    last, best = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "run" / "best.pt")
    best_step = min(last.metrics, key=lambda m: m["val_loss"])["step"]
    assert best.step == best_step and best.metrics[-1]["val_loss"] == last.best_val


def test_resuming_a_run_its_patience_stopped_trains_no_more(corpus: Path, tmp_path: Path) -> None:
    from nextchar.training.train import train

    config = _small(corpus, lr=1e-12, max_steps=400, eval_every=5, patience=3, schedule="constant")
    train(config, tmp_path / "run", progress=False, log=lambda line: None)
    stopped = load_checkpoint(tmp_path / "run" / "last.pt").step
    lines: list[str] = []
    train(config, tmp_path / "run", resume=True, progress=False, log=lines.append)
    assert load_checkpoint(tmp_path / "run" / "last.pt").step == stopped < 400
    assert any("--patience" in line for line in lines)
