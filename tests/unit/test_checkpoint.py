"""The checkpoint record: typed fields, a dict of plain values on disk, loadable with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from nextchar.training.checkpoint import FORMAT, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from nextchar.training.config import ModelConfig  # noqa: E402
from nextchar.training.model import CharModel  # noqa: E402

VOCAB = list("abcdef")


def _record() -> Checkpoint:
    model = CharModel(ModelConfig(vocab_size=6, hidden_size=8, embedding_dim=4))
    return Checkpoint(model.config, VOCAB, model.state_dict(), corpus={"name": "x", "sha256": "0" * 64},
                      step=7, metrics=[{"step": 7, "val_loss": 1.5}], hidden=[torch.zeros(2, 3, 8)] * 2,
                      rng={"torch": torch.get_rng_state()})


def test_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    ckpt = _record()
    save_checkpoint(tmp_path / "c.pt", ckpt)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # plain values only: no pickled classes
    assert raw["format"] == FORMAT and raw["model_config"] == ckpt.model_config.to_dict()
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.model_config == ckpt.model_config and back.vocab == VOCAB and back.step == 7
    assert back.metrics == ckpt.metrics and back.corpus == ckpt.corpus
    assert all(torch.equal(back.model_state[k], v) for k, v in ckpt.model_state.items())
    assert [h.shape for h in back.hidden] == [(2, 3, 8)] * 2


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="other"), "is not a nextchar.checkpoint.v1"),
    (lambda d: d.pop("model_state"), "lacks model_state"),
    (lambda d: d.update(surprise=1), "unknown fields surprise"),
    (lambda d: d.update(vocab=VOCAB[:-1]), "vocab has 5 characters but vocab_size is 6"),
    (lambda d: d["model_config"].update(hidden_size=0), "invalid model_config: hidden_size must be >= 1"),
])
def test_from_dict_names_what_is_wrong(change, message: str) -> None:
    d = _record().to_dict()
    change(d)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.from_dict(d, "checkpoint 'c.pt'")
