"""The seminar presets, exported: onnxruntime alone reproduces torch's teacher-forced reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import json  # noqa: E402
import math  # noqa: E402

from nextchar.client.cli import main as nextchar_cli  # noqa: E402
from nextchar.server.core.artifact import load_artifact  # noqa: E402
from nextchar.training.checkpoint import load_checkpoint  # noqa: E402
from nextchar.training.corpora import load_corpus  # noqa: E402
from nextchar.training.export import export_model  # noqa: E402
from nextchar.training.presets import get_preset, train_preset  # noqa: E402


def onnx_reconstruction(version_dir: Path, text: str, seq_len: int) -> str:
    """The seminar's evaluation with nothing but the artifact, numpy and onnxruntime.

    Every window of `seq_len` (stride 1) in one batch from zero states; the first window's argmax
    string, then each later window's last argmax: a prediction of text[1:].
    """
    artifact = load_artifact(version_dir)
    m = artifact.manifest
    index = {ch: i for i, ch in enumerate(artifact.vocab)}
    ids = np.array([index[ch] for ch in text], dtype=np.int64)
    starts = np.arange(len(ids) - seq_len)[:, None]
    windows = ids[starts + np.arange(seq_len)[None, :]]
    zeros = np.zeros((m.architecture.num_layers, len(windows), m.architecture.hidden_size), np.float32)
    feeds = {m.io.tokens: windows, m.io.h0: zeros}
    if m.io.c0:
        feeds[m.io.c0] = zeros
    sess = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
    best = sess.run([m.io.logits], feeds)[0].argmax(-1)
    first = "".join(artifact.vocab[t] for t in best[0])
    return first + "".join(artifact.vocab[t] for t in best[1:, -1])


def test_exported_lstm_preset_reproduces_torch_reconstruction(tmp_path: Path) -> None:
    """In process: train_preset -> export_model -> onnxruntime."""
    torch.set_num_threads(1)
    preset_name = "seed-lstm"
    preset = get_preset(preset_name)
    result = train_preset(preset, seed=0)
    assert result.accuracy > 0.9  # the seminar's runs learn their text; a failed run would prove little
    version_dir = export_model(result.model, result.vocab, tmp_path, preset_name, training={
        "corpus": {"name": result.corpus.name, "sha256": result.corpus.sha256,
                   "bytes": result.corpus.num_bytes, "chars": len(result.corpus.text)},
        "metrics": {"train_loss": result.history[-1]["loss"]},
        "step": preset.epochs, "train_config": preset.to_dict(), "seed": 0,
    })
    text = onnx_reconstruction(version_dir, result.corpus.text, preset.seq_len)
    assert len(text) == len(result.corpus.text) - 1
    assert text == result.reconstruction


def test_cli_rnn_preset_exports_and_reproduces(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Command line: `nextchar train --preset` -> checkpoint -> `nextchar export --int8` -> onnxruntime."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    assert nextchar_cli(["train", "--preset", "seed-rnn", "--out", str(run), "--threads", "1"]) == 0
    checkpoint = next(run.glob("*.pt"))
    assert nextchar_cli(["export", "--checkpoint", str(checkpoint), "--repo", str(repo), "--name", "goethe",
                         "--int8"]) == 0
    version_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert version_dir == repo / "goethe" / "1"

    ckpt = load_checkpoint(checkpoint)
    preset = get_preset("seed-rnn")
    m = load_artifact(version_dir).manifest
    t = m.training
    assert (t.corpus_name, t.steps, t.seed) == ("goethe", preset.epochs, 0)
    assert t.corpus_sha256 == load_corpus("goethe").sha256
    assert 0 < t.final_train_loss < 1 and math.isnan(t.final_val_loss)  # presets have no validation split
    assert json.loads(t.config_json)["preset"] == "seed-rnn"
    assert m.int8.argmax_agreement > 0.5 and load_artifact(version_dir, variant="int8").model_path.is_file()

    text = onnx_reconstruction(version_dir, load_corpus(t.corpus_name).text, preset.seq_len)
    assert text == ckpt.reconstruction
