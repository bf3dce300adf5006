"""The ModelManifest of an export: architecture, provenance and training figures, from a model and its run."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import onnx
import torch

from nextchar.server.core import artifact as art
from nextchar.training.model import CharModel, parameter_count
from nextchar.v1 import manifest_pb2

CELL_TYPES = {
    "rnn": manifest_pb2.CELL_TYPE_RNN, "lstm": manifest_pb2.CELL_TYPE_LSTM, "gru": manifest_pb2.CELL_TYPE_GRU,
}


def build_manifest(
    model: CharModel, vocab: list[str], name: str, version: int,
    training: dict[str, Any] | None, opset: int, ir_version: int, io: manifest_pb2.IoNames,
) -> manifest_pb2.ModelManifest:
    """Everything but the files' sha256 and size, which exist only once the files are final.

    `training` holds the checkpoint's training keys (see export.TRAINING_KEYS); None leaves it unset.
    """
    c = model.config
    m = manifest_pb2.ModelManifest(
        format=art.FORMAT, name=name, version=version, vocab=vocab, io=io, model_file=art.MODEL_FILE,
        opset=opset, ir_version=ir_version, exporter=f"torch {torch.__version__} (torchscript)",
        onnx_version=onnx.__version__, created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        architecture=manifest_pb2.Architecture(
            cell=CELL_TYPES[c.cell],
            input_encoding=manifest_pb2.INPUT_ENCODING_EMBEDDING if c.embedding_dim
            else manifest_pb2.INPUT_ENCODING_ONE_HOT,
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers,
            embedding_dim=c.embedding_dim, dropout=c.dropout, parameter_count=parameter_count(model),
        ),
    )
    if training:
        m.training.CopyFrom(_training_info(training))
    return m


def _training_info(t: dict[str, Any]) -> manifest_pb2.TrainingInfo:
    corpus = t.get("corpus") or {}
    train_loss, val_loss = final_losses(t.get("metrics"))
    return manifest_pb2.TrainingInfo(
        corpus_name=str(corpus.get("name", "")), corpus_sha256=str(corpus.get("sha256", "")),
        corpus_bytes=int(corpus.get("bytes", 0)), corpus_chars=int(corpus.get("chars", 0)),
        final_train_loss=train_loss, final_val_loss=val_loss,
        steps=int(t.get("step", 0)), train_seconds=float(t.get("train_seconds", 0.0)),
        config_json=art.public_config_json(json.dumps(t.get("train_config", {}), default=str)),
        seed=int(t.get("seed", 0)),
    )


def final_losses(metrics: dict | list | None) -> tuple[float, float]:
    """(train, val) loss of the last evaluation; NaN for a figure the run does not have.

    `metrics` is one record or the trainer's history (a list of records, oldest first). The
    trainer's records say "train_loss"/"val_loss"; the seminar presets' say "loss" (all windows,
    no validation split) and end with a record whose loss is None.
    """
    records = [metrics] if isinstance(metrics, dict) else list(metrics or [])
    for record in reversed(records):
        train = record.get("train_loss", record.get("loss"))
        if train is not None:
            val = record.get("val_loss")
            return float(train), math.nan if val is None else float(val)
    return math.nan, math.nan


def without_file_hashes(m: manifest_pb2.ModelManifest) -> manifest_pb2.ModelManifest:
    """The manifest embedded in the ONNX files: a file cannot contain its own sha256 (or size), so
    every file hash and size is cleared; manifest.json beside the files has them."""
    e = manifest_pb2.ModelManifest()
    e.CopyFrom(m)
    e.ClearField("model_sha256")
    e.ClearField("model_size_bytes")
    if e.HasField("int8"):
        e.int8.ClearField("sha256")
        e.int8.ClearField("size_bytes")
    return e
