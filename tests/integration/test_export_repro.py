"""The seminar presets, exported: onnxruntime alone reproduces torch's teacher-forced reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from nextchar.server.artifact import load_artifact  # noqa: E402
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


@pytest.mark.parametrize("preset_name", ["seed-rnn", "seed-lstm"])
def test_exported_preset_reproduces_torch_reconstruction(tmp_path: Path, preset_name: str) -> None:
    torch.set_num_threads(1)
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
