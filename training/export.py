"""Export a CharModel to a self-describing ONNX artifact in `<repo>/<name>/<version>/`, atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from nextchar.server.core import artifact as art
from nextchar.server.core.kstep import GENERATION_FILE, build_generation_graph
from nextchar.training.checkpoint import CheckpointError, load_checkpoint
from nextchar.training.config import ModelConfig
from nextchar.training.corpora import BUILTIN, Corpus
from nextchar.training.manifest import build_manifest, without_file_hashes
from nextchar.training.model import CharModel
from nextchar.training.onnx_checks import (
    ExportError,
    check_generation_graph,
    check_symbolic_dims,
    parity_check,
)
from nextchar.training.quantize import quantize_int8
from nextchar.v1 import manifest_pb2

OPSET = 17
# onnxruntime-node 1.30 (the edge runtime) reads IR versions up to 13; the torchscript exporter
# at opset 17 writes 8. Checked, not assumed, because a newer exporter may raise it.
MAX_IR_VERSION = 13
IO_NAMES = {"tokens": "tokens", "h0": "h0", "c0": "c0", "logits": "logits", "hn": "hn", "cn": "cn"}
# Checkpoint fields that become the manifest's TrainingInfo.
TRAINING_KEYS = ("corpus", "metrics", "step", "train_seconds", "train_config", "seed")


class _ExportModule(nn.Module):
    """CharModel with the recurrent state as explicit graph inputs and outputs (no hidden defaults)."""

    def __init__(self, model: CharModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """tokens int64[B, T], h0 (, c0) float32[L, B, H] -> logits float32[B, T, V], hn (, cn)."""
        state = (h0, c0) if c0 is not None else (h0,)
        logits, new = self.model(tokens, state)
        return (logits, *new)


def io_names(config: ModelConfig) -> manifest_pb2.IoNames:
    """The graph's input/output names; c0/cn are empty unless the cell is an LSTM."""
    names = dict(IO_NAMES)
    if not config.has_cell_state:
        names["c0"] = names["cn"] = ""
    return manifest_pb2.IoNames(**names)


def export_model(
    model: CharModel,
    vocab: list[str],
    repo: Path,
    name: str,
    version: int | None = None,
    training: dict[str, Any] | None = None,
    int8: bool = False,
    eval_text: str | None = None,
) -> Path:
    """Export `model` as `<repo>/<name>/<version>/` and return that directory.

    `version` defaults to the highest existing version + 1. `training` holds the checkpoint's
    training keys (TRAINING_KEYS). `eval_text` is held-out text for the int8 comparison
    (random tokens when None). The version appears all at once or not at all.
    """
    config = model.config
    try:
        art.validate_model_name(name)
    except art.ModelNameError as e:
        raise ExportError(str(e)) from None
    if len(vocab) != config.vocab_size or any(len(ch) != 1 for ch in vocab) or len(set(vocab)) != len(vocab):
        raise ExportError(
            f"vocab must be {config.vocab_size} distinct single characters, got {len(vocab)} entries"
        )
    model_dir = Path(repo) / name
    existing = art.list_versions(Path(repo), name)
    if version is None:
        version = existing[-1] + 1 if existing else 1
    elif isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportError(f"version must be an integer >= 1, got {version!r}")
    if version in existing:
        raise ExportError(f"{model_dir / str(version)} already exists; versions are immutable, pick another")

    model_dir.mkdir(parents=True, exist_ok=True)
    # A dot-directory beside the versions: scan_repository ignores it, so readers never see a
    # half-written version, and the final os.rename is atomic on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    was_training = model.training
    model.eval()
    try:
        _write_version(model, vocab, tmp, name, version, training, int8, eval_text)
        # mkdtemp makes the directory 0700 and the rename keeps it: a server running as another user
        # (a container's uid, a service account) could not read the version. The umask decides, as for
        # the files in it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        return _publish(tmp, model_dir / str(version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)


def export_checkpoint(
    checkpoint: Path, repo: Path, name: str, version: int | None = None, int8: bool = False
) -> Path:
    """Export a checkpoint written by the trainer; its training keys become the manifest's TrainingInfo."""
    try:
        ckpt = load_checkpoint(checkpoint)
        model = CharModel(ckpt.model_config)
        model.load_state_dict(ckpt.model_state)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # bad config dict or mismatched weights
        raise ExportError(f"checkpoint {str(checkpoint)!r} does not describe a loadable model: {e}") from None
    training = {k: getattr(ckpt, k) for k in TRAINING_KEYS}
    vocab = list(ckpt.vocab)
    return export_model(model, vocab, repo, name, version, training, int8, _builtin_text(training))


def _builtin_text(training: dict[str, Any]) -> str | None:
    """The training corpus's text when it is a built-in one with the recorded hash (for int8 figures)."""
    corpus = training.get("corpus") or {}
    text = BUILTIN.get(corpus.get("name", ""))
    if text is not None and Corpus(corpus["name"], text).sha256 == corpus.get("sha256"):
        return text
    return None


def _write_version(
    model: CharModel, vocab: list[str], out: Path, name: str, version: int,
    training: dict[str, Any] | None, int8: bool, eval_text: str | None,
) -> None:
    config = model.config
    io = io_names(config)
    fp32 = out / art.MODEL_FILE
    _torch_export(model, fp32)
    graph = onnx.load(str(fp32))
    check_symbolic_dims(graph, config, io)
    _check_ir_version(graph, fp32)

    manifest = build_manifest(model, vocab, name, version, training, OPSET, graph.ir_version, io)
    if int8:
        tokens = _eval_tokens(vocab, eval_text)
        manifest.int8.CopyFrom(
            quantize_int8(fp32, out / art.INT8_FILE, io, (config.num_layers, config.hidden_size), tokens)
        )
        manifest.int8.file = art.INT8_FILE
        _check_ir_version(onnx.load(str(out / art.INT8_FILE)), out / art.INT8_FILE)

    # Both files carry the same embedded manifest, with every file hash and size left empty:
    # a file cannot contain its own sha256. manifest.json beside them has the real ones.
    embedded = without_file_hashes(manifest)
    _set_metadata(fp32, embedded, vocab)
    parity_check(fp32, model, io)
    # The K-step generation graph for every runtime (the server builds the same from model.onnx).
    generation = out / GENERATION_FILE
    io_map = {k: getattr(io, k) for k in ("tokens", "h0", "c0", "logits", "hn", "cn")}
    onnx.save(build_generation_graph(onnx.load(str(fp32)), io_map), str(generation))
    _fsync(generation)
    check_generation_graph(fp32, generation, io, config)
    manifest.model_sha256, manifest.model_size_bytes = art.file_sha256(fp32), fp32.stat().st_size
    if int8:
        int8_path = out / art.INT8_FILE
        _set_metadata(int8_path, embedded, vocab)
        manifest.int8.sha256, manifest.int8.size_bytes = art.file_sha256(int8_path), int8_path.stat().st_size
    _write_text(out / art.MANIFEST_FILE, art.manifest_to_json(manifest) + "\n")


def _check_ir_version(graph: onnx.ModelProto, path: Path) -> None:
    if graph.ir_version > MAX_IR_VERSION:
        raise ExportError(
            f"{path.name} has IR version {graph.ir_version}; edge runtimes read at most {MAX_IR_VERSION}"
        )


def _torch_export(model: CharModel, path: Path) -> None:
    c = model.config
    # Batch 2 and seq 3, not 1: the torchscript tracer may specialise dimensions of size 1.
    batch, seq = 2, 3
    tokens = torch.zeros((batch, seq), dtype=torch.long)
    state = model.init_state(batch)
    names = io_names(c)
    inputs = [names.tokens, names.h0] + ([names.c0] if c.has_cell_state else [])
    outputs = [names.logits, names.hn] + ([names.cn] if c.has_cell_state else [])
    dynamic = {names.tokens: {0: "batch", 1: "seq"}, names.logits: {0: "batch", 1: "seq"}}
    dynamic.update({n: {1: "batch"} for n in inputs[1:] + outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (below), and the LSTM batch-size warning is about
        # implicit initial states, which this graph does not have.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        # nn.RNN's input-size checks become trace constants; harmless, as the fixed dims are
        # checked on the saved graph and parity is tested at several shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The legacy (torchscript) exporter emits native ONNX LSTM/GRU/RNN nodes, which the
        # dynamo exporter unrolls; native nodes are also what int8 quantization recognises.
        # The wrapper must be in eval mode too: the exporter restores the module it was given to that
        # module's own mode afterwards, and a fresh wrapper's is train(), which would switch the model's
        # dropout on for the parity check (a dropout > 0 model then never exported).
        torch.onnx.export(
            _ExportModule(model).eval(), (tokens, *state), str(path), dynamo=False, opset_version=OPSET,
            input_names=inputs, output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True,
        )


def _set_metadata(path: Path, manifest: manifest_pb2.ModelManifest, vocab: list[str]) -> None:
    """Embed the manifest (proto3 JSON) and the vocabulary (a JSON array) in the ONNX file's metadata."""
    graph = onnx.load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    props[art.META_MANIFEST] = art.manifest_to_json(manifest)
    props[art.META_VOCAB] = json.dumps(vocab, ensure_ascii=False)
    onnx.helper.set_model_props(graph, props)  # replaces all props: no duplicate keys on a rewrite
    onnx.save(graph, str(path))
    _fsync(path)


def _eval_tokens(vocab: list[str], text: str | None, seq: int = 64, max_windows: int = 32) -> np.ndarray:
    """int64[B, seq] windows of `text` (characters outside the vocab dropped), or random tokens."""
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = [index[ch] for ch in (text or "") if ch in index]
    if len(ids) < seq:
        return np.random.default_rng(0).integers(0, len(vocab), size=(16, seq), dtype=np.int64)
    starts = range(0, len(ids) - seq + 1, max(1, (len(ids) - seq) // max_windows))
    return np.array([ids[s:s + seq] for s in list(starts)[:max_windows]], dtype=np.int64)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> Path:
    """Move the finished version into place with one rename; refuse to replace an existing version."""
    if final.exists():
        raise ExportError(f"{final} already exists (another export won the race); nothing was replaced")
    try:
        os.rename(tmp, final)
    except OSError as e:
        raise ExportError(f"could not publish {final}: {e}") from None
    _fsync(final.parent)
    return final
