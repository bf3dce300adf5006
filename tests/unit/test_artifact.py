"""server/core/artifact.py: repository scanning and file-level validation of exported model versions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nextchar.server.core.artifact import (
    INT8_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ArtifactError,
    ModelNameError,
    list_versions,
    load_artifact,
    scan_repository,
    validate_model_name,
)
from nextchar.v1 import manifest_pb2


def _edit_manifest(version_dir: Path, edit) -> None:
    path = version_dir / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _expect_error(version_dir: Path, *fragments: str, variant: str = "fp32") -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(version_dir, variant=variant)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_load_artifact_of_exported_models(model_repo: Path, name: str) -> None:
    a = load_artifact(model_repo / name / "1")
    assert (a.name, a.version, a.path) == (name, 1, model_repo / name / "1")
    assert a.model_path == model_repo / name / "1" / MODEL_FILE
    assert a.vocab == tuple(a.manifest.vocab) and len(a.vocab) == a.manifest.architecture.vocab_size
    assert "O" in a.vocab and "’" in a.vocab  # the anthem's characters, typographic apostrophe included
    assert a.model_bytes == a.model_path.read_bytes()  # the checked bytes, for the engine to load
    int8 = load_artifact(model_repo / name / "1", variant="int8")
    assert int8.model_path.name == INT8_FILE and int8.manifest == a.manifest
    assert int8.model_bytes == int8.model_path.read_bytes() != a.model_bytes
    assert "model_bytes" not in repr(a)  # megabytes stay out of logs and tracebacks


def test_scan_repository_ignores_temp_and_non_version_dirs(model_repo_copy: Path) -> None:
    repo = model_repo_copy
    for version in ("2", "10"):
        shutil.copytree(repo / "gru" / "1", repo / "gru" / version)
    # An export in progress (or killed), non-canonical or non-integer names, stray files.
    shutil.copytree(repo / "gru" / "1", repo / "gru" / ".export-abc123")
    for junk in ("07", "0", "-1", "latest", "+3"):
        (repo / "gru" / junk).mkdir()
    (repo / "gru" / "11").write_text("a file, not a version directory")
    (repo / ".hidden-model" / "1").mkdir(parents=True)
    (repo / "empty-model").mkdir()
    (repo / "README").write_text("not a model")

    assert scan_repository(repo) == {"gru": [1, 2, 10], "lstm": [1], "rnn": [1]}
    assert list_versions(repo, "gru") == [1, 2, 10]  # numeric, not lexicographic
    assert list_versions(repo, "empty-model") == [] and list_versions(repo, "no-such-model") == []


def test_scan_repository_requires_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a directory"):
        scan_repository(tmp_path / "missing")


@pytest.mark.parametrize("name", ["lstm", "char-rnn_v2.1", "A", "9lives", "x" * 128])
def test_validate_model_name_accepts(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "a..b", "../etc", "a/b", "a\\b", ".hidden", "-flag", "_x", "a b", "ümlaut", "x" * 129, "a\n"],
)
def test_validate_model_name_rejects(name: str) -> None:
    with pytest.raises(ModelNameError):
        validate_model_name(name)
    assert issubclass(ModelNameError, ArtifactError) and issubclass(ModelNameError, ValueError)


def test_list_versions_rejects_unsafe_names(model_repo: Path) -> None:
    with pytest.raises(ModelNameError):
        list_versions(model_repo, "../lstm")


def test_truncated_model_file_is_refused(model_repo_copy: Path) -> None:
    d = model_repo_copy / "lstm" / "1"
    data = (d / MODEL_FILE).read_bytes()
    (d / MODEL_FILE).write_bytes(data[: len(data) // 2])
    _expect_error(d, str(d / MODEL_FILE), "size", "truncated")


def test_same_size_corruption_is_caught_by_sha256(model_repo_copy: Path) -> None:
    d = model_repo_copy / "gru" / "1"
    data = bytearray((d / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / MODEL_FILE).write_bytes(bytes(data))
    _expect_error(d, str(d / MODEL_FILE), "sha256")


def test_wrong_sha256_in_manifest_is_refused(model_repo_copy: Path) -> None:
    d = model_repo_copy / "rnn" / "1"
    _edit_manifest(d, lambda m: m.update(model_sha256="0" * 64))
    _expect_error(d, "sha256", "0" * 64)


def test_missing_files(model_repo_copy: Path) -> None:
    d = model_repo_copy / "lstm" / "1"
    (d / INT8_FILE).unlink()
    _expect_error(d, str(d / INT8_FILE), "missing", variant="int8")
    (d / MODEL_FILE).unlink()
    _expect_error(d, str(d / MODEL_FILE), "missing")
    (d / MANIFEST_FILE).unlink()
    _expect_error(d, str(d / MANIFEST_FILE), "missing")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("{not json", "not a valid ModelManifest"), ('{"format": "nextchar.v1", "surprise": 1}', "surprise"),
     ('{"version": "one"}', "not a valid ModelManifest")],
)
def test_unparsable_manifest(model_repo_copy: Path, text: str, fragment: str) -> None:
    d = model_repo_copy / "gru" / "1"
    (d / MANIFEST_FILE).write_text(text, encoding="utf-8")
    _expect_error(d, str(d / MANIFEST_FILE), fragment)


def test_name_and_version_must_match_directories(model_repo_copy: Path) -> None:
    repo = model_repo_copy
    shutil.copytree(repo / "gru" / "1", repo / "other" / "1")
    _expect_error(repo / "other" / "1", "'gru'", "'other'")
    (repo / "gru" / "1").rename(repo / "gru" / "2")
    _expect_error(repo / "gru" / "2", "version 1", "'2'")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda m: m.update(format="nextchar.v0"), ("format", "nextchar.v0")),
        (lambda m: m["vocab"].__setitem__(1, m["vocab"][0]), ("duplicate",)),
        (lambda m: m["vocab"].__setitem__(0, "ab"), ("vocab[0]", "exactly one character")),
        (lambda m: m["vocab"].pop(), ("vocab_size",)),
        (lambda m: m["io"].pop("c0"), ("io.c0", "LSTM")),
        (lambda m: m["io"].pop("logits"), ("io.logits",)),
        (lambda m: m["architecture"].pop("cell"), ("cell",)),
        (lambda m: m.update(model_file="../1/model.onnx"), ("plain file name",)),
        (lambda m: m.pop("int8"), ("no int8 variant",)),
    ],
)
def test_invalid_manifest_fields(model_repo_copy: Path, edit, fragments: tuple[str, ...]) -> None:
    d = model_repo_copy / "lstm" / "1"
    _edit_manifest(d, edit)
    # The int8 case only bites when that variant is asked for; all others fail either way.
    variant = "int8" if "no int8 variant" in fragments else "fp32"
    _expect_error(d, str(d / MANIFEST_FILE), *fragments, variant=variant)


def test_state_names_only_for_lstm(model_repo_copy: Path) -> None:
    d = model_repo_copy / "gru" / "1"
    _edit_manifest(d, lambda m: m["io"].update(c0="c0"))
    _expect_error(d, "io.c0", "only an LSTM")


def test_unknown_variant(model_repo: Path) -> None:
    with pytest.raises(ArtifactError, match="fp32, int8"):
        load_artifact(model_repo / "lstm" / "1", variant="fp16")


def test_enum_values_round_trip(model_repo: Path) -> None:
    a = load_artifact(model_repo / "gru" / "1")
    assert a.manifest.architecture.cell == manifest_pb2.CELL_TYPE_GRU
    assert a.manifest.architecture.input_encoding == manifest_pb2.INPUT_ENCODING_ONE_HOT


def test_artifact_module_needs_no_torch_onnx_or_onnxruntime() -> None:
    code = (
        "import sys, nextchar.server.core.artifact\n"
        "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
