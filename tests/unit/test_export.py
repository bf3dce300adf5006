"""training/export.py: graph shapes, parity with torch, metadata, atomic versions, int8, bad input."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from nextchar.server.core.artifact import (  # noqa: E402
    INT8_FILE,
    MANIFEST_FILE,
    META_MANIFEST,
    META_VOCAB,
    MODEL_FILE,
    file_sha256,
    load_artifact,
    scan_repository,
)
from nextchar.training import export as export_mod  # noqa: E402
from nextchar.training.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from nextchar.training.config import ModelConfig  # noqa: E402
from nextchar.training.corpora import load_corpus  # noqa: E402
from nextchar.training.export import ExportError, export_checkpoint, export_model  # noqa: E402
from nextchar.training.model import CharModel  # noqa: E402
from nextchar.v1 import manifest_pb2  # noqa: E402

VARIANTS = [(cell, emb) for cell in ("rnn", "gru", "lstm") for emb in (0, 6)]
VOCAB = list("\n abcdefghij.?’")


def _ids(variant: tuple[str, int]) -> str:
    return f"{variant[0]}-{'embedding' if variant[1] else 'onehot'}"


def _model(cell: str, embedding_dim: int = 0, seed: int = 0, hidden: int = 12) -> CharModel:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(VOCAB), cell=cell, hidden_size=hidden, embedding_dim=embedding_dim)
    return CharModel(config)


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_saved_graph_has_symbolic_batch_and_seq(tmp_path: Path, variant: tuple[str, int]) -> None:
    cell, emb = variant
    d = export_model(_model(cell, emb), VOCAB, tmp_path, "m")
    graph = onnx.load(str(d / MODEL_FILE))
    values = {v.name: v for v in [*graph.graph.input, *graph.graph.output]}
    lstm = cell == "lstm"
    assert [v.name for v in graph.graph.input] == ["tokens", "h0", *(["c0"] if lstm else [])]
    assert [v.name for v in graph.graph.output] == ["logits", "hn", *(["cn"] if lstm else [])]
    assert _dims(values["tokens"]) == ["batch", "seq"]
    assert values["tokens"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(values["logits"]) == ["batch", "seq", len(VOCAB)]
    for name in ["h0", "hn", *(["c0", "cn"] if lstm else [])]:
        assert _dims(values[name]) == [2, "batch", 12]
        assert values[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The recurrence stays one native node per layer (the torchscript exporter), not an unrolled loop.
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count({"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]) == 2
    assert graph.opset_import[0].version == 17 and graph.ir_version <= 13


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_onnxruntime_matches_torch_with_random_states(tmp_path: Path, variant: tuple[str, int]) -> None:
    cell, emb = variant
    model = _model(cell, emb, seed=3).eval()
    sess = _session(export_model(model, VOCAB, tmp_path, "m") / MODEL_FILE)
    rng = np.random.default_rng(1)
    for batch, seq in [(1, 1), (8, 1), (1, 100), (5, 9)]:
        tokens = rng.integers(0, len(VOCAB), size=(batch, seq))
        n_states = 2 if cell == "lstm" else 1
        states = [rng.normal(0, 0.7, size=(2, batch, 12)).astype(np.float32) for _ in range(n_states)]
        with torch.no_grad():
            logits, new = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in states))
        feeds = {"tokens": tokens, "h0": states[0], **({"c0": states[1]} if cell == "lstm" else {})}
        got = sess.run(None, feeds)
        want = [logits.numpy(), *(s.numpy() for s in new)]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            assert np.max(np.abs(g - w)) <= 1e-4


def test_a_model_trained_with_dropout_exports_as_its_eval_mode(tmp_path: Path) -> None:
    """Dropout is a training-time layer: the export (and its parity check) use the model in eval mode."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=len(VOCAB), hidden_size=12, embedding_dim=4, dropout=0.5,
                         input_dropout=0.2)
    model = CharModel(config).train()
    sess = _session(export_model(model, VOCAB, tmp_path, "m") / MODEL_FILE)
    assert model.training  # the caller's mode is restored
    tokens = np.array([[1, 4, 2]])
    zeros = np.zeros((2, 1, 12), np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(tokens))[0].numpy()
    got = sess.run(["logits"], {"tokens": tokens, "h0": zeros, "c0": zeros})[0]
    assert np.max(np.abs(got - want)) <= 1e-4


def test_state_carries_across_calls(tmp_path: Path) -> None:
    """Feeding a prompt in one call or one token at a time gives the same logits (explicit state works)."""
    sess = _session(export_model(_model("lstm", seed=5), VOCAB, tmp_path, "m") / MODEL_FILE)
    tokens = np.array([[1, 4, 2, 9, 3, 0, 7]])
    zeros = np.zeros((2, 1, 12), np.float32)
    whole = sess.run(["logits"], {"tokens": tokens, "h0": zeros, "c0": zeros})[0]
    h, c, steps = zeros, zeros, []
    for t in range(tokens.shape[1]):
        logits, h, c = sess.run(None, {"tokens": tokens[:, t:t + 1], "h0": h, "c0": c})
        steps.append(logits)
    assert np.max(np.abs(np.concatenate(steps, axis=1) - whole)) <= 1e-5


def test_metadata_round_trip(model_repo: Path) -> None:
    d = model_repo / "lstm" / "1"
    on_disk = json_format.Parse((d / MANIFEST_FILE).read_text(encoding="utf-8"), manifest_pb2.ModelManifest())
    expected = manifest_pb2.ModelManifest()
    expected.CopyFrom(on_disk)
    for field in ("model_sha256", "model_size_bytes"):
        expected.ClearField(field)
    expected.int8.ClearField("sha256")
    expected.int8.ClearField("size_bytes")
    for file_name in (MODEL_FILE, INT8_FILE):
        props = {p.key: p.value for p in onnx.load(str(d / file_name)).metadata_props}
        embedded = json_format.Parse(props[META_MANIFEST], manifest_pb2.ModelManifest())
        assert embedded == expected, file_name
        assert json.loads(props[META_VOCAB]) == list(on_disk.vocab)
        # What a runtime sees, without the onnx package.
        meta = _session(d / file_name).get_modelmeta().custom_metadata_map
        assert json.loads(meta[META_VOCAB]) == list(on_disk.vocab)
    assert on_disk.model_sha256 == file_sha256(d / MODEL_FILE)
    assert on_disk.model_size_bytes == (d / MODEL_FILE).stat().st_size
    assert on_disk.int8.sha256 == file_sha256(d / INT8_FILE)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_manifest_describes_model_and_training(model_repo: Path, trained_models: dict, name: str) -> None:
    model, vocab, training = trained_models[name]
    m = load_artifact(model_repo / name / "1").manifest
    graph = onnx.load(str(model_repo / name / "1" / MODEL_FILE))
    assert (m.format, m.name, m.version, m.model_file) == ("nextchar.v1", name, 1, MODEL_FILE)
    assert list(m.vocab) == vocab
    a = m.architecture
    assert a.cell == {"rnn": manifest_pb2.CELL_TYPE_RNN, "gru": manifest_pb2.CELL_TYPE_GRU,
                      "lstm": manifest_pb2.CELL_TYPE_LSTM}[name]
    assert (a.vocab_size, a.hidden_size, a.num_layers, a.embedding_dim) == (len(vocab), 48, 2, 0)
    assert a.parameter_count == sum(p.numel() for p in model.parameters())
    assert (m.opset, m.ir_version) == (17, graph.ir_version)
    assert m.exporter == f"torch {torch.__version__} (torchscript)" and m.onnx_version == onnx.__version__
    assert datetime.strptime(m.created_at, "%Y-%m-%dT%H:%M:%SZ")
    t = m.training
    anthem = load_corpus("anthem")
    assert (t.corpus_name, t.corpus_sha256, t.corpus_bytes, t.corpus_chars) == (
        "anthem", anthem.sha256, anthem.num_bytes, len(anthem.text))
    assert t.final_train_loss == pytest.approx(training["metrics"]["train_loss"])
    assert math.isnan(t.final_val_loss)  # no validation split in the fixture's run
    assert t.steps == training["step"] and t.seed == 0
    # paths are published as base names (issue 13.8): "tests/conftest.py" -> "conftest.py"
    assert json.loads(t.config_json) == {**training["train_config"], "trainer": "conftest.py"}


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_int8_variant_loads_runs_and_is_measured(model_repo: Path, name: str) -> None:
    d = model_repo / name / "1"
    m = load_artifact(d, variant="int8").manifest  # size and sha256 checked there
    q = m.int8
    assert q.file == INT8_FILE and q.size_bytes == (d / INT8_FILE).stat().st_size
    assert 0.9 <= q.argmax_agreement <= 1.0  # measured on the anthem the models were trained on
    assert 0.0 < q.max_abs_logit_diff < 10.0
    int8_ops = {n.op_type for n in onnx.load(str(d / INT8_FILE)).graph.node}
    assert q.quantized_op_types and set(q.quantized_op_types) <= int8_ops
    assert "MatMulInteger" in q.quantized_op_types  # the head
    if name == "lstm":  # LSTM weights are initializers, so the whole cell is quantized
        assert "DynamicQuantizeLSTM" in q.quantized_op_types and "LSTM" not in int8_ops
        assert q.size_bytes < 0.5 * m.model_size_bytes
    sess = _session(d / INT8_FILE)
    feeds = {"tokens": np.zeros((3, 4), np.int64), "h0": np.zeros((2, 3, 48), np.float32)}
    if name == "lstm":
        feeds["c0"] = feeds["h0"]
    shapes = [o.shape for o in sess.run(None, feeds)]
    assert shapes[:2] == [(3, 4, len(m.vocab)), (2, 3, 48)]


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_int8_variant_for_every_cell_and_encoding(tmp_path: Path, variant: tuple[str, int]) -> None:
    cell, emb = variant
    d = export_model(_model(cell, emb), VOCAB, tmp_path, "m", int8=True)
    a = load_artifact(d, variant="int8")
    q = a.manifest.int8
    assert 0.0 <= q.argmax_agreement <= 1.0 and q.max_abs_logit_diff >= 0.0 and q.quantized_op_types
    assert ("DynamicQuantizeLSTM" in q.quantized_op_types) == (cell == "lstm")
    feeds = {"tokens": np.array([[0, 5, 14]]), "h0": np.zeros((2, 1, 12), np.float32)}
    if cell == "lstm":
        feeds["c0"] = feeds["h0"]
    assert _session(a.model_path).run(["logits"], feeds)[0].shape == (1, 3, len(VOCAB))


def test_versions_are_numbered_and_immutable(tmp_path: Path) -> None:
    model = _model("gru")
    assert export_model(model, VOCAB, tmp_path, "m") == tmp_path / "m" / "1"
    assert export_model(model, VOCAB, tmp_path, "m").name == "2"
    assert export_model(model, VOCAB, tmp_path, "m", version=7).name == "7"
    assert export_model(model, VOCAB, tmp_path, "m").name == "8"
    before = file_sha256(tmp_path / "m" / "2" / MODEL_FILE)
    with pytest.raises(ExportError, match="already exists"):
        export_model(_model("gru", seed=9), VOCAB, tmp_path, "m", version=2)
    assert file_sha256(tmp_path / "m" / "2" / MODEL_FILE) == before
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ExportError, match="version must be an integer >= 1"):
            export_model(model, VOCAB, tmp_path, "m", version=bad)
    assert scan_repository(tmp_path) == {"m": [1, 2, 7, 8]}
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".")]


def test_a_published_version_is_readable_by_other_users_as_the_umask_allows(tmp_path: Path) -> None:
    """A server running as another user (a container's uid, a service account) reads the version: its
    directory follows the umask like the files in it (mkdtemp makes 0700, and the rename kept it)."""
    old = os.umask(0o022)
    try:
        version = export_model(_model("gru"), VOCAB, tmp_path, "m")
    finally:
        os.umask(old)
    assert version.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in version.iterdir())


def test_crash_before_publish_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def crash(tmp: Path, final: Path) -> Path:
        seen.append(tmp)
        # Fully written, not yet visible.
        assert (tmp / MODEL_FILE).is_file() and (tmp / MANIFEST_FILE).is_file()
        assert scan_repository(tmp_path) == {}
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export_mod, "_publish", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_model(_model("rnn"), VOCAB, tmp_path, "m", int8=True)
    assert seen and not seen[0].exists()  # the temporary directory was cleaned up
    assert scan_repository(tmp_path) == {} and os.listdir(tmp_path / "m") == []


def test_killed_export_is_invisible_and_does_not_block(tmp_path: Path) -> None:
    """A process killed mid-export leaves a dot-directory: readers skip it and the next export proceeds."""
    d = export_model(_model("rnn"), VOCAB, tmp_path, "m")
    leftover = tmp_path / "m" / ".export-killed"
    leftover.mkdir()
    (leftover / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:100])
    assert scan_repository(tmp_path) == {"m": [1]}
    assert export_model(_model("rnn"), VOCAB, tmp_path, "m").name == "2"


def test_parity_failure_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod._torch_export

    def export_other_weights(model: CharModel, path: Path) -> None:
        real(_model(model.config.cell, seed=123), path)  # a graph that is not this model

    monkeypatch.setattr(export_mod, "_torch_export", export_other_weights)
    with pytest.raises(ExportError, match="parity: logits differs by"):
        export_model(_model("lstm"), VOCAB, tmp_path, "m")
    assert scan_repository(tmp_path) == {} and os.listdir(tmp_path / "m") == []


@pytest.mark.filterwarnings("ignore")  # the legacy exporter's own warnings, called directly here
def test_fixed_batch_dimension_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def export_static(model: CharModel, path: Path) -> None:
        state = model.init_state(2)
        torch.onnx.export(export_mod._ExportModule(model), (torch.zeros((2, 3), dtype=torch.long), *state),
                          str(path), dynamo=False, opset_version=17, input_names=["tokens", "h0"],
                          output_names=["logits", "hn"])

    monkeypatch.setattr(export_mod, "_torch_export", export_static)
    with pytest.raises(ExportError, match="'tokens' has shape \\[2, 3\\]"):
        export_model(_model("gru"), VOCAB, tmp_path, "m")
    assert os.listdir(tmp_path / "m") == []


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "", ".m", "a..b", "-m", "x" * 129])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ExportError, match="model name"):
        export_model(_model("rnn"), VOCAB, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x").exists()


def test_vocab_must_fit_the_model(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="vocab"):
        export_model(_model("rnn"), VOCAB[:-1], tmp_path, "m")
    with pytest.raises(ExportError, match="vocab"):
        export_model(_model("rnn"), [*VOCAB[:-1], VOCAB[0]], tmp_path, "m")


def _checkpoint(path: Path, model: CharModel, **extras) -> Path:
    save_checkpoint(path, Checkpoint(model.config, VOCAB, model.state_dict(), **extras))
    return path


def test_export_checkpoint_records_training_info(tmp_path: Path) -> None:
    model = _model("lstm", embedding_dim=4)
    training = {
        "corpus": {"name": "notes.txt", "sha256": "ab" * 32, "bytes": 1234, "chars": 1200},
        "metrics": [{"train_loss": 1.25, "val_loss": 1.5}], "step": 300, "train_seconds": 12.5,
        "train_config": {"lr": 0.002, "batch_size": 32}, "seed": 42,
        "optimizer": {"ignored": torch.zeros(1)},
    }
    ckpt = _checkpoint(tmp_path / "ck.pt", model, **training)
    d = export_checkpoint(ckpt, tmp_path / "repo", "c", int8=True)
    m = load_artifact(d).manifest
    t = m.training
    corpus = (t.corpus_name, t.corpus_sha256, t.corpus_bytes, t.corpus_chars)
    assert corpus == ("notes.txt", "ab" * 32, 1234, 1200)
    figures = (t.final_train_loss, t.final_val_loss, t.steps, t.train_seconds, t.seed)
    assert figures == (1.25, 1.5, 300, 12.5, 42)
    assert json.loads(t.config_json) == {"lr": 0.002, "batch_size": 32}
    assert m.architecture.embedding_dim == 4 and m.int8.file == INT8_FILE
    sess = _session(d / MODEL_FILE)
    tokens = np.array([[1, 2, 3]])
    zeros = np.zeros((2, 1, 12), np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens))[0].numpy()
    got = sess.run(["logits"], {"tokens": tokens, "h0": zeros, "c0": zeros})[0]
    assert np.max(np.abs(got - want)) <= 1e-4  # the checkpoint's weights, not fresh ones


def test_export_checkpoint_bad_inputs(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.pt", repo, "m")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(512))
    with pytest.raises(ExportError, match="corrupt or not a nextchar checkpoint"):
        export_checkpoint(garbage, repo, "m")
    truncated = tmp_path / "truncated.pt"
    data = _checkpoint(tmp_path / "ok.pt", _model("gru")).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"truncated\.pt"):
        export_checkpoint(truncated, repo, "m")
    wrong = _model("gru", hidden=13)
    mismatched = _checkpoint(tmp_path / "mismatch.pt", _model("gru"))
    payload = torch.load(mismatched, weights_only=True)
    payload["model_state"] = wrong.state_dict()
    torch.save(payload, mismatched)
    with pytest.raises(ExportError, match="does not describe a loadable model"):
        export_checkpoint(mismatched, repo, "m")
    assert not repo.exists() or scan_repository(repo) == {}


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"train_loss": 1.5, "val_loss": 1.75}, (1.5, 1.75)),
        ([{"train_loss": 2.0, "val_loss": 2.5}, {"train_loss": 1.0, "val_loss": 1.25}], (1.0, 1.25)),
        # The seminar presets: "loss" over all windows, no validation, a final record without a loss.
        ([{"epoch": 0, "loss": 3.0}, {"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": None}], (0.5, math.nan)),
        ({"train_loss": 0.25, "val_loss": None}, (0.25, math.nan)),
        (None, (math.nan, math.nan)),
        ([], (math.nan, math.nan)),
    ],
)
def test_final_losses(metrics, expected: tuple[float, float]) -> None:
    from nextchar.training.manifest import final_losses

    got = final_losses(metrics)
    assert all((math.isnan(g) and math.isnan(e)) or g == e for g, e in zip(got, expected, strict=True)), got


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_generation_graph_is_written_and_checked(tmp_path: Path, cell: str) -> None:
    version = export_model(_model(cell), VOCAB, tmp_path, "m")
    gen = _session(version / "generate.onnx")
    assert [i.name for i in gen.get_inputs()][-4:] == ["u", "temperature", "top_k", "top_p"]
    assert gen.get_outputs()[0].name == "new_tokens"


def test_a_generation_graph_that_disagrees_publishes_nothing(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = export_mod.build_generation_graph

    def other_weights(model, io):  # the graph of another model: its greedy tokens differ
        other = tmp_path / "other.onnx"
        real_export = export_mod._torch_export
        real_export(_model("lstm", seed=123), other)
        return real(export_mod.onnx.load(str(other)), io)

    monkeypatch.setattr(export_mod, "build_generation_graph", other_weights)
    with pytest.raises(ExportError, match="differ from the per-step loop"):
        export_model(_model("lstm"), VOCAB, tmp_path / "repo", "m")
    assert scan_repository(tmp_path / "repo") == {}
