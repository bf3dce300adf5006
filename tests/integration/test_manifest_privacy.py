"""The served manifest names the corpus and its sha256, never a path of the training machine (issue 13.8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nextchar.client.client import NextCharClient
from nextchar.server.core.artifact import public_manifest
from nextchar.v1 import manifest_pb2

TRAINING_DIR = "/home/trainer/private/corpora"


@pytest.fixture(scope="module")
def repo_with_paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from nextchar.training.config import ModelConfig
    from nextchar.training.export import export_model
    from nextchar.training.model import CharModel

    torch.manual_seed(0)
    vocab = list(" abcdefghijklmnopqrstuvwxyz")
    model = CharModel(ModelConfig(vocab_size=len(vocab), cell="gru", hidden_size=8, num_layers=1))
    training = {"corpus": {"name": "notes.txt", "sha256": "ab" * 32, "bytes": 10, "chars": 10},
                "train_config": {"corpus": f"{TRAINING_DIR}/notes.txt", "lr": 0.01,
                                 "out": "C:\\\\Users\\\\trainer\\\\runs"}}
    repo = tmp_path_factory.mktemp("repo")
    export_model(model, vocab, repo, "notes", 1, training=training)
    return repo


def test_list_and_get_model_carry_no_training_paths(make_server, repo_with_paths: Path) -> None:
    server = make_server(repo_with_paths)
    with NextCharClient(server.address, timeout=30) as client:
        manifests = [client.get_model("notes").manifest, *(m.manifest for m in client.list_models())]
    for manifest in manifests:
        training = manifest.training
        assert (training.corpus_name, training.corpus_sha256) == ("notes.txt", "ab" * 32)
        config = json.loads(training.config_json)
        assert config["corpus"] == "notes.txt" and config["lr"] == 0.01 and config["out"] == "runs"
        assert "trainer" not in str(manifest)
    on_disk = (repo_with_paths / "notes" / "1" / "manifest.json").read_text()
    assert TRAINING_DIR not in on_disk  # the export does not write it either


def test_an_older_manifest_with_paths_is_served_without_them() -> None:
    old = manifest_pb2.ModelManifest(name="old", training=manifest_pb2.TrainingInfo(
        corpus_name="c.txt", config_json=json.dumps({"corpus": f"{TRAINING_DIR}/c.txt", "seed": 3})))
    served = public_manifest(old)
    assert json.loads(served.training.config_json) == {"corpus": "c.txt", "seed": 3}
    assert TRAINING_DIR in old.training.config_json  # the loaded artifact itself is left as it was
