"""`nextchar train` / `nextchar export` on the command line: the seminar output and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nextchar.client.cli import main  # noqa: E402
from nextchar.training.checkpoint import load_checkpoint  # noqa: E402
from nextchar.training.config import RECIPES  # noqa: E402
from nextchar.training.corpora import BUILTIN  # noqa: E402

CLI = [sys.executable, "-m", "nextchar.client.cli"]


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_preset_prints_the_seminar_progress_and_saves_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "rnn"
    r = run("train", "--preset", "seed-rnn", "--seed", "0", "--out", str(out), "--threads", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    headers = [line for line in lines if line.startswith("------ ")]
    assert headers == [f"------ {e} ------" for e in (0, 10, 20, 30, 40, 50, 51)]
    after_30 = lines[lines.index("------ 30 ------") + 1]
    text = BUILTIN["goethe"]
    assert len(after_30) == len(text) - 1
    assert sum(a == b for a, b in zip(after_30, text[1:], strict=True)) >= 0.95 * (len(text) - 1)
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.vocab == sorted(set(text)) and ckpt.seed == 0
    assert ckpt.model_config.hidden_size == len(ckpt.vocab) and ckpt.model_config.cell == "rnn"
    assert ckpt.reconstruction == lines[-2]  # the last block is the trained model's reconstruction
    assert {p.name for p in out.iterdir()} >= {"last.pt", "metrics.jsonl", "metrics.csv", "loss.png"}
    # Not resumable as a --corpus run: a plain refusal naming the preset (it was a traceback).
    again = run("train", "--corpus", "goethe", "--seq", "5", "--batch", "2", "--out", str(out), "--resume",
                "--max-steps", "10", "--threads", "1", "--no-progress")
    assert again.returncode == 2 and "--preset seed-rnn" in again.stderr and "Traceback" not in again.stderr


def test_char_rnn_run_from_the_command_line(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    r = run("train", "--corpus", str(corpus), "--cell", "gru", "--hidden", "16", "--layers", "1",
            "--embedding", "8", "--batch", "4", "--seq", "20", "--max-steps", "30", "--eval-every", "15",
            "--sample-chars", "10", "--out", str(out), "--threads", "1", "--seed", "3")
    assert r.returncode == 0, r.stderr
    evals = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(evals) == 2 and "val " in evals[0] and "nats/char" in evals[0] and "bpc" in evals[0]
    assert "greedy: " in r.stdout and "T=0.8: " in r.stdout
    assert "chars_s=" in r.stderr  # the progress bar
    assert load_checkpoint(out / "best.pt").model_config.cell == "gru"


BAD_FILES = {
    "empty.txt": (b"", "is empty"),
    "one.txt": (b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 10, "only 1 distinct character"),
    "short.txt": (b"abc def", "has 7 characters, not more than the sequence length 100 (--seq)"),
    "latin1.txt": ("abc é".encode("latin-1"), "is not UTF-8: invalid byte 0xe9 at byte offset 4"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_corpus_files(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    assert main(["train", "--corpus", str(tmp_path / name), "--max-steps", "5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and name in err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "0"], "lr (--lr) must be > 0, got 0.0"),
        (["--lr", "-1"], "lr (--lr) must be > 0"),
        (["--hidden", "0"], "hidden_size (--hidden) must be >= 1, got 0"),
        (["--dropout", "1"], "dropout (--dropout) must be in [0, 1), got 1.0"),
        (["--batch", "0"], "batch_size (--batch) must be >= 1, got 0"),
        (["--seq", "0"], "seq_len (--seq) must be >= 1, got 0"),
        (["--layers", "0"], "num_layers (--layers) must be >= 1"),
        (["--eval-every", "0"], "eval_every (--eval-every) must be >= 1"),
        (["--max-steps", "0"], "set --max-steps or --max-minutes"),
    ],
)
def test_invalid_hyperparameters_exit_2_naming_flag_and_range(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--corpus", "anthem", "--max-steps", "5", *args, "--out", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_names_and_conflicting_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    assert main(["train", "--preset", "seed-gru", "--out", out]) == 2
    assert "unknown preset 'seed-gru'" in capsys.readouterr().err
    assert main(["train", "--corpus", "faust", "--max-steps", "5", "--out", out]) == 1
    assert "unknown corpus 'faust'" in capsys.readouterr().err
    assert main(["train", "--preset", "seed-rnn", "--hidden", "64", "--out", out]) == 2
    assert "drop --hidden" in capsys.readouterr().err
    assert main(["train", "--preset", "seed-rnn", "--device", "cuda", "--out", out]) == 2  # it ignored it
    assert "drop --device cuda" in capsys.readouterr().err
    assert main(["train", "--max-steps", "5", "--out", out]) == 2
    assert "--preset NAME or --corpus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--corpus", "anthem", "--cell", "transformer"])
    assert e.value.code == 2 and "--cell" in capsys.readouterr().err
    assert not Path(out).exists()


def test_bad_input_exits_non_zero_as_a_process(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    r = run("train", "--corpus", "anthem", "--max-steps", "5", "--dropout", "1.5", "--out", out)
    assert r.returncode == 2
    assert "dropout (--dropout) must be in [0, 1), got 1.5" in r.stderr
    assert "Traceback" not in r.stderr


def test_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    repo = str(tmp_path / "repo")
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--repo", repo, "--name", "m"]) == 1
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert main(["export", "--checkpoint", str(corrupt), "--repo", repo, "--name", "m"]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "corrupt.pt" in err and len(err.splitlines()) == 1
    assert not Path(repo, "m").exists()

    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "seed-rnn", "--out", str(run_dir), "--threads", "1"]) == 0
    ckpt = str(run_dir / "last.pt")
    assert main(["export", "--checkpoint", ckpt, "--repo", repo, "--name", "m", "--version", "3"]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", ckpt, "--repo", repo, "--name", "m", "--version", "3"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_a_time_budget_alone_is_a_complete_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the rain in spain stays mainly in the plain. " * 40, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--corpus", str(corpus), "--cell", "lstm", "--hidden", "8", "--layers", "2",
            "--embedding", "0", "--dropout", "0.1", "--batch", "4", "--seq", "16", "--lr", "2e-3",
            "--max-minutes", "0.002", "--eval-every", "50", "--out", str(out), "--seed", "0", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "reached --max-minutes" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt").train_config["schedule"] == "cosine-time"


def test_the_shakespeare_recipe_fills_in_what_flags_leave_out(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "sonnet.txt"
    verse = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n"
    corpus.write_text(verse * 30, encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--preset", "shakespeare", "--corpus", str(corpus), "--hidden", "16", "--batch", "4",
            "--seq", "16", "--max-steps", "3", "--eval-every", "3", "--sample-chars", "0", "--threads", "1",
            "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    logged = capsys.readouterr().out
    assert "step 3 epoch" in logged and "greedy:" not in logged  # --sample-chars 0: no continuations
    config = load_checkpoint(out / "last.pt").train_config
    recipe = RECIPES["shakespeare"]
    assert (config["hidden_size"], config["batch_size"], config["max_steps"]) == (16, 4, 3)  # the flags
    for kept in ("cell", "num_layers", "embedding_dim", "dropout", "ema", "lr", "schedule", "max_minutes"):
        assert config[kept] == recipe[kept]  # the recipe
