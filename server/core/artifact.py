"""The model repository on disk: `<repo>/<name>/<version>/` read and validated file by file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

from google.protobuf import json_format

from nextchar.v1 import manifest_pb2
from nextchar.v1.manifest_pb2 import ModelManifest

# The artifact layout, in one place for the exporter and the server.
FORMAT = "nextchar.v1"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
META_MANIFEST = "nextchar.manifest"  # ONNX metadata_props key: the manifest as proto3 JSON
META_VOCAB = "nextchar.vocab"        # ONNX metadata_props key: JSON array of the characters
VARIANTS = ("fp32", "int8")

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Version directories are canonical positive decimals: "7", never "07" or "+7", so that a
# version has exactly one directory.
_VERSION = re.compile(r"[1-9][0-9]*")


class ArtifactError(Exception):
    """A model directory that cannot be served; the message names the file and the problem."""


class ModelNameError(ArtifactError, ValueError):
    """A model name that is not a safe directory name (a caller's mistake, not a broken file)."""


@dataclass(frozen=True)
class Artifact:
    """One validated model version: the ONNX file's checked bytes and the manifest that describes it.

    `model_bytes` are the bytes whose size and sha256 were checked, read once: every loader (the
    onnxruntime session, the generation graph) takes them, never the path, so a file replaced
    after the check is not served. `model_path` only names them in messages and logs.
    """

    name: str
    version: int
    path: Path          # the version directory
    model_path: Path    # the ONNX file of the chosen variant (for messages; load model_bytes)
    manifest: ModelManifest
    vocab: tuple[str, ...]
    model_bytes: bytes = dataclasses.field(repr=False)  # the checked content of model_path


def validate_model_name(name: str) -> str:
    """Return `name` if it is a safe directory name: [A-Za-z0-9][A-Za-z0-9._-]*, no '..', ≤128 chars."""
    if not isinstance(name, str) or not name:
        raise ModelNameError("model name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise ModelNameError(f"model name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not _NAME.fullmatch(name) or ".." in name:
        raise ModelNameError(
            f"model name {name!r} is invalid: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, and no '..'"
        )
    return name


def manifest_to_json(manifest: ModelManifest) -> str:
    """The manifest as written to manifest.json and into the ONNX metadata."""
    return json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=2)


def manifest_from_json(text: str, source: str) -> ModelManifest:
    """Parse proto3 JSON; unknown fields are an error (a newer exporter's file is not silently half-read)."""
    try:
        return json_format.Parse(text, ModelManifest())
    except json_format.ParseError as e:
        raise ArtifactError(f"{source}: not a valid ModelManifest: {e}") from None


def public_config_json(text: str) -> str:
    """A training config (JSON) fit to publish: every value that looks like a file path becomes its
    base name, so a manifest never carries a directory of the training machine (the corpus is known
    by TrainingInfo's corpus_name and corpus_sha256). Text that is not a JSON object is dropped."""
    try:
        config = json.loads(text) if text else {}
    except ValueError:
        return "{}"
    if not isinstance(config, dict):
        return "{}"
    public = {k: PurePath(v.replace("\\", "/")).name if isinstance(v, str) and ("/" in v or "\\" in v)
              else v for k, v in config.items()}
    return json.dumps(public, sort_keys=True, default=str)


def public_manifest(manifest: ModelManifest) -> ModelManifest:
    """`manifest` as served (ListModels, GetModel): its training config without paths."""
    if not manifest.HasField("training"):
        return manifest
    public = ModelManifest()
    public.CopyFrom(manifest)
    public.training.config_json = public_config_json(manifest.training.config_json)
    return public


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_repository(root: Path) -> dict[str, list[int]]:
    """Names -> sorted versions; dot-directories (exports in progress) and non-integer names are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"model repository {str(root)!r} is not a directory")
    models: dict[str, list[int]] = {}
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith(".") or not _NAME.fullmatch(model_dir.name):
            continue
        versions = sorted(
            int(d.name) for d in model_dir.iterdir()
            if d.is_dir() and _VERSION.fullmatch(d.name)
        )
        if versions:
            models[model_dir.name] = versions
    return models


def list_versions(root: Path, name: str) -> list[int]:
    """Sorted versions of one model; [] when it has none."""
    model_dir = Path(root) / validate_model_name(name)
    if not model_dir.is_dir():
        return []
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and _VERSION.fullmatch(d.name))


def load_artifact(version_dir: Path, *, variant: str = "fp32") -> Artifact:
    """Read and check `<repo>/<name>/<version>/`: manifest, vocab, io names, the model file's size and sha256.

    The size and hash check means a truncated or half-copied model file is refused here, before
    any runtime sees it: the file is read once (only the chosen variant's), and the checked bytes are
    what the engine loads. Graph-level checks (the ONNX inputs really are these names) are the engine's.
    """
    version_dir = Path(version_dir)
    if variant not in VARIANTS:
        raise ArtifactError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    manifest_path = version_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: missing")
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: unreadable: {e}") from None
    m = manifest_from_json(text, str(manifest_path))
    where = str(manifest_path)

    if m.format != FORMAT:
        raise ArtifactError(f"{where}: format is {m.format!r}, expected {FORMAT!r}")
    name = version_dir.parent.name
    if m.name != name:
        raise ArtifactError(f"{where}: name {m.name!r} does not match its directory {name!r}")
    if not _VERSION.fullmatch(version_dir.name) or m.version != int(version_dir.name):
        raise ArtifactError(f"{where}: version {m.version} does not match its directory {version_dir.name!r}")
    vocab = _check_vocab(m, where)
    _check_architecture(m, where)
    _check_io(m, where)

    if variant == "fp32":
        file_name, sha, size = m.model_file, m.model_sha256, m.model_size_bytes
    else:
        if not m.HasField("int8") or not m.int8.file:
            raise ArtifactError(f"{where}: no int8 variant was exported for {name} v{m.version}")
        file_name, sha, size = m.int8.file, m.int8.sha256, m.int8.size_bytes
    model_path, model_bytes = _read_model_file(version_dir, file_name, sha, size, where)
    return Artifact(name=name, version=m.version, path=version_dir, model_path=model_path, manifest=m,
                    vocab=vocab, model_bytes=model_bytes)


def _check_vocab(m: ModelManifest, where: str) -> tuple[str, ...]:
    vocab = tuple(m.vocab)
    for i, ch in enumerate(vocab):
        if len(ch) != 1:
            raise ArtifactError(f"{where}: vocab[{i}] is {ch!r}; each entry must be exactly one character")
    if len(set(vocab)) != len(vocab):
        dups = sorted({ch for ch in vocab if vocab.count(ch) > 1})
        raise ArtifactError(f"{where}: vocab has duplicate characters {dups!r}")
    if len(vocab) != m.architecture.vocab_size:
        raise ArtifactError(
            f"{where}: vocab has {len(vocab)} characters "
            f"but architecture.vocab_size is {m.architecture.vocab_size}"
        )
    return vocab


def _check_architecture(m: ModelManifest, where: str) -> None:
    a = m.architecture
    if a.cell == manifest_pb2.CELL_TYPE_UNSPECIFIED:
        raise ArtifactError(f"{where}: architecture.cell is unspecified")
    if a.vocab_size < 2 or a.hidden_size < 1 or a.num_layers < 1:
        raise ArtifactError(
            f"{where}: architecture needs vocab_size >= 2, hidden_size >= 1, num_layers >= 1; got "
            f"{a.vocab_size}, {a.hidden_size}, {a.num_layers}"
        )


def _check_io(m: ModelManifest, where: str) -> None:
    io = m.io
    for field in ("tokens", "h0", "logits", "hn"):
        if not getattr(io, field):
            raise ArtifactError(f"{where}: io.{field} is empty")
    lstm = m.architecture.cell == manifest_pb2.CELL_TYPE_LSTM
    for field in ("c0", "cn"):
        if lstm and not getattr(io, field):
            raise ArtifactError(f"{where}: io.{field} is empty but an LSTM needs a cell state")
        if not lstm and getattr(io, field):
            raise ArtifactError(f"{where}: io.{field} is set but only an LSTM has a cell state")


def _read_model_file(version_dir: Path, file_name: str, sha: str, size: int,
                     where: str) -> tuple[Path, bytes]:
    """The model file's path and its bytes, read once, of the manifest's size and sha256."""
    if not file_name or Path(file_name).name != file_name or file_name.startswith("."):
        raise ArtifactError(f"{where}: model file {file_name!r} must be a plain file name in its directory")
    path = version_dir / file_name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (named by {where})")
    data = b""
    try:
        actual_size = path.stat().st_size
        if actual_size == size:  # a wrong size is refused before reading a file of any length
            with path.open("rb") as f:
                data = f.read(size + 1)  # one byte more: a file that grew since stat() is caught
            actual_size = len(data)
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable: {e}") from None
    if actual_size != size:
        raise ArtifactError(
            f"{path}: size is {actual_size} bytes but the manifest says {size} (truncated or replaced)"
        )
    actual_sha = hashlib.sha256(data).hexdigest()
    if actual_sha != sha:
        raise ArtifactError(
            f"{path}: sha256 is {actual_sha} but the manifest says {sha!r} (corrupt or replaced)"
        )
    return path, data
