"""The char-rnn trainer in process: outputs of a run, exact resume, stopping rules, evaluation."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nextchar.training.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from nextchar.training.config import ConfigError, TrainConfig  # noqa: E402
from nextchar.training.corpora import CorpusError  # noqa: E402
from nextchar.training.model import CharModel  # noqa: E402
from nextchar.training.train import evaluate, generate, train  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "cat", "sat", "on", "mat"]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(r.choice(words) for _ in range(800)), encoding="utf-8")
    return path


def tiny(corpus: Path, **kw: object) -> TrainConfig:
    base = dict(corpus=str(corpus), hidden_size=24, num_layers=2, embedding_dim=8, dropout=0.2, batch_size=8,
                seq_len=12, lr=3e-3, max_steps=60, eval_every=20, patience=0, sample_chars=16)
    return TrainConfig(**{**base, **kw})


def quiet(_: str) -> None:
    pass


class Killed(Exception):
    pass


def test_a_run_writes_checkpoints_metrics_and_a_plot(corpus: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    p = train(tiny(corpus), tmp_path / "run", progress=False, log=lines.append)
    run = tmp_path / "run"
    files = {f.name for f in run.iterdir()}
    assert files == {"last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "loss.png"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    assert records[-1]["val_loss"] < records[0]["val_loss"] < math.log(len(set(corpus.read_text())))
    for r in records:
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([r["val_loss"] for r in records])
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [line for line in lines if line.startswith("step ")]
    assert len(evals) == 3 and "nats/char" in evals[0] and "bpc" in evals[0]
    assert any(line.startswith("  greedy: ") for line in lines)
    assert any(line.startswith("  T=0.8: ") for line in lines)

    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last.step == 60 and p.step == 60
    assert best.best_val == min(r["val_loss"] for r in records)
    assert last.vocab == sorted(set(corpus.read_text()))
    assert last.corpus["name"] == "words.txt" and last.corpus["chars"] == len(corpus.read_text())
    assert len(last.corpus["sha256"]) == 64 and last.corpus["bytes"] == corpus.stat().st_size
    assert last.optimizer["state"] and last.scheduler["kind"] == "cosine" and "torch" in last.rng
    assert [h.shape for h in last.hidden] == [(2, 8, 24)] * 2 and last.train_seconds > 0 and last.seed == 0
    assert TrainConfig.from_dict(last.train_config) == tiny(corpus)


def weights(path: Path) -> dict:
    return load_checkpoint(path).model_state


def test_resume_after_an_interruption_ends_with_the_same_weights(corpus: Path, tmp_path: Path) -> None:
    config = tiny(corpus, max_steps=70, schedule="cosine", warmup_steps=5)
    train(config, tmp_path / "a", progress=False, log=quiet)

    def die_at_step_60(line: str) -> None:
        if line.startswith("step 60 "):
            raise Killed  # after step 60's evaluation, before its checkpoint: last.pt is step 40's
    with pytest.raises(Killed):
        train(config, tmp_path / "b", progress=False, log=die_at_step_60)
    assert load_checkpoint(tmp_path / "b" / "last.pt").step == 40
    train(config, tmp_path / "b", resume=True, progress=False, log=quiet)
    a, b = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    ma = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    mb = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert (ma["step"], ma["val_loss"], ma["train_loss"]) == (mb["step"], mb["val_loss"], mb["train_loss"])


def test_resuming_a_finished_run_trains_nothing(corpus: Path, tmp_path: Path) -> None:
    """--resume on a run that already reached --max-steps stops at once (it trained one step more and
    rewrote last.pt, its metrics and the step count a later export records)."""
    config = tiny(corpus, max_steps=20)
    train(config, tmp_path / "a", progress=False, log=quiet)
    before = (tmp_path / "a" / "last.pt").read_bytes()
    lines: list[str] = []
    train(config, tmp_path / "a", resume=True, progress=False, log=lines.append)
    assert (tmp_path / "a" / "last.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "a" / "last.pt").step == 20
    assert any("reached --max-steps 20" in line for line in lines), lines


def val_split(corpus: Path):
    from nextchar.training.data import split
    from nextchar.training.tokens import open_corpus

    return split(open_corpus(str(corpus)).tokens, 0.1)[1]


def test_ema_evaluates_checkpoints_and_resumes_the_weight_average(corpus: Path, tmp_path: Path) -> None:
    """--ema: the val loss is the average's, model_state is the average (what export reads),
    train_state the weights as trained; a resume continues both exactly."""
    config = tiny(corpus, max_steps=60, schedule="cosine", ema=0.9)
    train(config, tmp_path / "a", progress=False, log=quiet)
    last = load_checkpoint(tmp_path / "a" / "last.pt")
    assert last.train_state.keys() == last.model_state.keys()
    assert all(not torch.equal(last.model_state[k], last.train_state[k]) for k in last.model_state)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    served = CharModel(last.model_config)
    served.load_state_dict(last.model_state)
    val = evaluate(served, val_split(corpus), config.batch_size, config.seq_len)
    assert records[-1]["val_loss"] == pytest.approx(val, rel=1e-6)  # the average was evaluated
    trained = CharModel(last.model_config)
    trained.load_state_dict(last.train_state)
    assert evaluate(trained, val_split(corpus), config.batch_size, config.seq_len) != pytest.approx(val)

    def die_at_step_60(line: str) -> None:
        if line.startswith("step 60 "):
            raise Killed
    with pytest.raises(Killed):
        train(config, tmp_path / "b", progress=False, log=die_at_step_60)
    train(config, tmp_path / "b", resume=True, progress=False, log=quiet)
    resumed = load_checkpoint(tmp_path / "b" / "last.pt")
    for k in last.model_state:
        assert float((last.model_state[k] - resumed.model_state[k]).abs().max()) <= 1e-6
        assert float((last.train_state[k] - resumed.train_state[k]).abs().max()) <= 1e-6


def test_weight_average_is_an_exponential_moving_average() -> None:
    from nextchar.training.train import weight_average

    model = torch.nn.Linear(2, 1)
    average = weight_average(model, 0.75)
    history = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        history.append(value)
    want = history[0]  # the first update copies; later ones: 0.75 * average + 0.25 * weights
    for v in history[1:]:
        want = 0.75 * want + 0.25 * v
    assert torch.allclose(average.module.weight, torch.full((1, 2), want))


def test_different_seeds_give_different_models(corpus: Path, tmp_path: Path) -> None:
    train(tiny(corpus, max_steps=20, seed=0), tmp_path / "s0", progress=False, log=quiet)
    train(tiny(corpus, max_steps=20, seed=1), tmp_path / "s1", progress=False, log=quiet)
    a, b = weights(tmp_path / "s0" / "last.pt"), weights(tmp_path / "s1" / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(corpus: Path, tmp_path: Path) -> None:
    train(tiny(corpus, max_steps=20), tmp_path / "r", progress=False, log=quiet)
    before = (tmp_path / "r" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny(corpus, max_steps=20), tmp_path / "r", progress=False, log=quiet)
    assert (tmp_path / "r" / "last.pt").read_bytes() == before
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny(corpus), tmp_path / "empty", resume=True, progress=False, log=quiet)
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match=r"hidden_size=24 \(now 32\)"):
        train(tiny(corpus, hidden_size=32), tmp_path / "r", resume=True, progress=False, log=quiet)
    # cosine-time's horizon is --max-minutes: a new one would make the lr jump back up on resume
    timed = tiny(corpus, max_steps=0, max_minutes=1e-4, schedule="cosine-time")
    train(timed, tmp_path / "t", progress=False, log=quiet)
    with pytest.raises(ConfigError, match=r"max_minutes=0.0001 \(now 1\)"):
        train(tiny(corpus, max_steps=0, max_minutes=1, schedule="cosine-time"), tmp_path / "t", resume=True,
              progress=False, log=quiet)


def test_time_budget_and_patience_stop_a_run(corpus: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    p = train(tiny(corpus, max_steps=0, max_minutes=1e-4, schedule="constant"), tmp_path / "t",
              progress=False, log=lines.append)
    assert p.step < 10 and "reached --max-minutes" in lines[-1]
    lines.clear()
    # lr so small the val loss cannot improve after the first evaluation; plateau also halves lr
    flat = tiny(corpus, max_steps=400, lr=1e-12, dropout=0.0, schedule="plateau", patience=4, eval_every=5)
    p = train(flat, tmp_path / "p", progress=False, log=lines.append)
    assert p.step < 400 and "--patience" in lines[-1]
    assert p.lr_scale < 1.0


def test_corpus_too_small_for_the_split_or_the_batch(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text("abcdefghij" * 30, encoding="utf-8")
    with pytest.raises(CorpusError, match="validation split"):
        train(tiny(small, seq_len=40), tmp_path / "o", progress=False, log=quiet)
    with pytest.raises(CorpusError, match="--batch 64 x --seq 12"):
        train(tiny(small, batch_size=64), tmp_path / "o", progress=False, log=quiet)
    assert not (tmp_path / "o").exists()


def test_evaluate_is_the_mean_cross_entropy_over_the_text() -> None:
    torch.manual_seed(0)
    from nextchar.training.config import ModelConfig

    model = CharModel(ModelConfig(vocab_size=5, cell="gru", hidden_size=8, num_layers=1))
    tokens = torch.randint(5, (101,))
    logits, _ = model(tokens[None, :-1])
    want = torch.nn.functional.cross_entropy(logits[0], tokens[1:]).item()
    # one stream, chunks of 7 with the state carried: the same as one pass over the whole text
    assert evaluate(model, tokens, batch=1, seq_len=7) == pytest.approx(want, rel=1e-5)


def test_generate_greedy_is_deterministic_and_sampling_follows_the_generator() -> None:
    torch.manual_seed(0)
    from nextchar.training.config import ModelConfig

    vocab = list("abcde")
    model = CharModel(ModelConfig(vocab_size=5, cell="lstm", hidden_size=8, num_layers=2))
    assert generate(model, vocab, "ab", 20, None) == generate(model, vocab, "ab", 20, None)
    s1 = generate(model, vocab, "a", 30, 1.0, torch.Generator().manual_seed(1))
    s2 = generate(model, vocab, "a", 30, 1.0, torch.Generator().manual_seed(1))
    assert s1 == s2 and len(s1) == 30 and set(s1) <= set(vocab)


SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (the long-run corpus)")
def test_tinyshakespeare_trains_briefly(tmp_path: Path) -> None:
    config = TrainConfig(corpus=str(SHAKESPEARE), hidden_size=16, num_layers=1, embedding_dim=8,
                         batch_size=16, seq_len=32, lr=1e-2, max_steps=30, eval_every=30, schedule="constant",
                         sample_chars=8)
    p = train(config, tmp_path / "run", progress=False, log=quiet)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert len(ckpt.vocab) == 65 and ckpt.corpus["chars"] == 1_115_394
    assert p.metrics[-1]["val_loss"] < math.log(65)  # better than uniform after 30 steps
