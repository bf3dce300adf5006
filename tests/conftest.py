"""Shared fixtures: a model repository of three briefly trained models, and a tiny-model exporter.

`model_repo` (session, read-only): `<tmp>/lstm/1`, `<tmp>/gru/1`, `<tmp>/rnn/1`, each one-hot,
hidden 48, 2 layers, trained for a second or two on the built-in `anthem` corpus so that greedy
text from "O say" is recognisably the anthem; each has model.onnx, model.int8.onnx and manifest.json.
Tests that add or change versions use `model_repo_copy`. Fixtures that need torch skip cleanly
when it is not installed, so the torch-free server tests still run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MODEL_NAMES = ("lstm", "gru", "rnn")
TRAIN_CORPUS = "anthem"
# (learning rate, steps) per cell: enough for greedy text to follow the anthem, in ~1 s each on one core.
_TRAINING = {"lstm": (0.03, 80), "gru": (0.03, 60), "rnn": (0.01, 80)}
_HIDDEN, _LAYERS, _WINDOW, _STRIDE, _SEED = 48, 2, 32, 8, 0
TINY_VOCAB = tuple("\n abcdefghijklmnopqrstuvwxyz.,?’")


def _require_training_stack() -> None:
    pytest.importorskip("torch", reason="torch is needed to train and export test models")
    pytest.importorskip("onnx", reason="onnx is needed to export test models")
    pytest.importorskip("onnxruntime", reason="onnxruntime is needed for the export parity check")


def train_briefly(cell: str, corpus: str = TRAIN_CORPUS, seed: int = _SEED) -> tuple[Any, list[str], dict]:
    """A plain full-batch loop (not the real trainer): returns (CharModel, vocab, training info dict)."""
    import torch
    from torch.nn import functional as F

    from nextchar.training.config import ModelConfig
    from nextchar.training.corpora import build_vocab, load_corpus
    from nextchar.training.model import CharModel

    torch.set_num_threads(1)
    text = load_corpus(corpus).text
    vocab = build_vocab(text)
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text])
    starts = range(0, len(ids) - _WINDOW - 1, _STRIDE)
    x = torch.stack([ids[s:s + _WINDOW] for s in starts])
    y = torch.stack([ids[s + 1:s + _WINDOW + 1] for s in starts])

    lr, steps = _TRAINING[cell]
    torch.manual_seed(seed)
    model = CharModel(ModelConfig(vocab_size=len(vocab), cell=cell, hidden_size=_HIDDEN, num_layers=_LAYERS))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    c = load_corpus(corpus)
    training = {
        "corpus": {"name": c.name, "sha256": c.sha256, "bytes": c.num_bytes, "chars": len(c.text)},
        "metrics": {"train_loss": loss.item(), "val_loss": None},
        "step": steps,
        "train_seconds": time.perf_counter() - t0,
        "train_config": {"trainer": "tests/conftest.py", "lr": lr, "steps": steps, "window": _WINDOW},
        "seed": seed,
    }
    return model, vocab, training


@pytest.fixture(scope="session")
def trained_models() -> dict[str, tuple[Any, list[str], dict]]:
    """name -> (CharModel in eval mode, vocab, training info) for MODEL_NAMES. Do not train them further."""
    _require_training_stack()
    return {name: train_briefly(name) for name in MODEL_NAMES}


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, trained_models: dict) -> Path:
    """A read-only repository with lstm/1, gru/1, rnn/1 (fp32 + int8). Copy it before writing."""
    from nextchar.training.corpora import load_corpus
    from nextchar.training.export import export_model

    repo = tmp_path_factory.mktemp("model_repo")
    text = load_corpus(TRAIN_CORPUS).text
    for name, (model, vocab, training) in trained_models.items():
        export_model(model, vocab, repo, name, version=1, training=training, int8=True, eval_text=text)
    return repo


@pytest.fixture
def model_repo_copy(model_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of `model_repo` for tests that add, remove or damage versions."""
    dst = tmp_path / "repo"
    shutil.copytree(model_repo, dst)
    return dst


@pytest.fixture
def export_tiny(tmp_path: Path) -> Callable[..., Path]:
    """Factory: export an untrained tiny model and return its version directory (fast, ~0.2 s).

    export_tiny(cell="lstm", embedding_dim=0, hidden_size=16, num_layers=2, vocab=TINY_VOCAB,
                repo=<tmp>/tiny_repo, name=cell, version=None, int8=False, seed=0)
    """
    _require_training_stack()

    def make(
        cell: str = "lstm", *, embedding_dim: int = 0, hidden_size: int = 16, num_layers: int = 2,
        vocab: tuple[str, ...] | list[str] = TINY_VOCAB, repo: Path | None = None, name: str | None = None,
        version: int | None = None, int8: bool = False, seed: int = 0,
    ) -> Path:
        import torch

        from nextchar.training.config import ModelConfig
        from nextchar.training.export import export_model
        from nextchar.training.model import CharModel

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        config = ModelConfig(
            vocab_size=len(vocab), cell=cell, hidden_size=hidden_size, num_layers=num_layers,
            embedding_dim=embedding_dim,
        )
        return export_model(
            CharModel(config), list(vocab), repo or tmp_path / "tiny_repo", name or cell, version, int8=int8
        )

    return make


@pytest.fixture(scope="session", autouse=True)
def _admin_on_a_free_port() -> Any:
    """Servers the tests start (in-process or `nextchar serve`) put Admin on a free loopback port, not
    the default one, which another server on this machine may hold."""
    patch = pytest.MonkeyPatch()
    patch.setenv("NEXTCHAR_ADMIN_ADDRESS", "127.0.0.1:0")
    yield
    patch.undo()


_FOLDER_MARKERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit -> `unit`, ...), so `pytest -m unit` selects a layer."""
    for item in items:
        parts = item.path.parts
        for name in _FOLDER_MARKERS:
            if name in parts:
                item.add_marker(getattr(pytest.mark, name))
