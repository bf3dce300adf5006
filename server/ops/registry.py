"""The loaded models: (name, version | latest) -> a validated, warmed-up engine; versions load on demand."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextchar.server.core import artifact as art

log = logging.getLogger(__name__)

# Artifact -> engine. The default is server.engine.Engine.load; tests may pass their own.
EngineLoader = Callable[[art.Artifact], Any]


class ModelNotFoundError(LookupError):
    """No such model, or no such version of it; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class LoadedModel:
    """One servable model version."""

    artifact: art.Artifact
    engine: Any  # server.engine.Engine: vocab, vocab_index, initial_state, step

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> int:
        return self.artifact.version


def engine_loader(variant: str = "fp32", intra_op_threads: int = 0) -> Callable[[Path], LoadedModel]:
    """The real loader: validate the files (load_artifact), build the onnxruntime engine, warm it up."""

    def load(version_dir: Path) -> LoadedModel:
        from nextchar.server.core.engine import Engine  # onnxruntime enters here, and only here

        artifact = art.load_artifact(version_dir, variant=variant)
        engine = Engine.load(artifact, intra_op_threads=intra_op_threads)
        engine.warmup()
        return LoadedModel(artifact, engine)

    return load


class Registry:
    """Every model of a repository. `load_latest()` loads each model's latest version (fail fast);
    other versions load the first time a request names them. Thread-safe: requests run in threads.
    """

    def __init__(self, root: Path, loader: Callable[[Path], LoadedModel]) -> None:
        self.root = Path(root)
        self._loader = loader
        self._lock = threading.Lock()
        self._versions: dict[str, list[int]] = {}
        self._latest: dict[str, int] = {}
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._loading: dict[tuple[str, int], threading.Lock] = {}  # versions being loaded on demand
        # Lifecycle (server.reload drives it): refused versions, calls in flight per loaded object, and
        # retired objects that unload once their last call ends. Counts and retirement go by object
        # identity, not by (name, version): a version loaded again (Admin LoadModel, a model directory
        # that comes back) is a second object, and the one it displaces must still unload, once.
        # An object counted here is alive: it is in `_loaded` or `_retiring` until its count is 0.
        self._errors: dict[str, dict[int, str]] = {}
        self._in_flight: dict[int, int] = {}              # id(model) -> calls in flight
        self._retiring: dict[int, LoadedModel] = {}       # id(model) -> model, unloads when idle
        self.on_unload: Callable[[LoadedModel], None] = lambda model: None

    def load_latest(self, allow_empty: bool = False) -> list[LoadedModel]:
        """Scan the repository and load the latest version of every model; ArtifactError if one is broken.

        An empty or missing repository is an ArtifactError too, unless `allow_empty` (the repository
        watcher will load what appears later): then nothing is loaded and [] is returned.
        """
        try:
            found = art.scan_repository(self.root)
        except art.ArtifactError:
            if not allow_empty:
                raise
            found = {}
        if not found:
            if allow_empty:
                log.warning("model repository %r has no models yet: not serving until one appears",
                            str(self.root))
                return []
            raise art.ArtifactError(f"model repository {str(self.root)!r} has no <name>/<version>/ models")
        loaded = []
        for name, versions in found.items():
            model = self._loader(self.root / name / str(versions[-1]))
            log.info("loaded %s v%d from %s", name, model.version, model.artifact.model_path)
            with self._lock:
                self._versions[name] = versions
                self._latest[name] = versions[-1]
                dropped = self._install(model)
            self._unloaded(dropped)
            loaded.append(model)
        return loaded

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._latest)

    def versions(self, name: str) -> list[int]:
        with self._lock:
            return list(self._versions.get(name, ()))

    def cached(self, name: str, version: int | None = None) -> LoadedModel | None:
        """The model if it is loaded (never blocks); None when `version` must be loaded first (`get`)."""
        with self._lock:
            self._check_name(name)
            return self._loaded.get((name, self._latest[name] if version is None else version))

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model `name` at `version` (None = the latest loaded at start); loads it on first use.

        Blocking (it may read and warm up an ONNX file): call it from a worker thread.
        """
        with self._lock:
            self._check_name(name)
            key = (name, self._latest[name] if version is None else version)
            hit = self._loaded.get(key)
            if hit is not None:
                return hit
            gate = self._loading.setdefault(key, threading.Lock())
        # The disk work happens outside the registry lock: `cached` runs on the event loop and must
        # never wait for it. The per-version gate makes racing first requests load it only once.
        with gate:
            with self._lock:
                hit = self._loaded.get(key)
            if hit is not None:
                return hit
            try:
                # A version exported after start shows up here: rescan this model's directory.
                versions = art.list_versions(self.root, name)
                with self._lock:
                    self._versions[name] = versions
                if key[1] not in versions:
                    listed = ", ".join(map(str, versions))
                    raise ModelNotFoundError(
                        "model.version", f"model {name!r} has no version {key[1]} (available: {listed})")
                model = self._loader(self.root / name / str(key[1]))
                log.info("loaded %s v%d on demand", name, key[1])
                # Never replace what is there: the reloader may have published this version meanwhile
                # (that object is served and kept), or removed the model (nothing of it is kept).
                with self._lock:
                    gone = name not in self._latest
                    kept = model if gone else self._loaded.setdefault(key, model)
                if gone or kept is not model:
                    self._unloaded([model])
                if gone:
                    raise ModelNotFoundError("model.name", f"model {name!r} was unloaded while its "
                                                           f"version {key[1]} loaded")
                return kept
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def _check_name(self, name: str) -> None:
        if name not in self._latest:
            known = ", ".join(sorted(self._latest)) or "none"
            raise ModelNotFoundError("model.name", f"no model named {name!r} (available: {known})")

    # --- lifecycle: hot reload, unload, and the in-flight count that decides when a version unloads ---

    def load(self, name: str, version: int) -> LoadedModel:
        """Validate and warm up `<root>/<name>/<version>/` without serving it (ArtifactError if broken)."""
        return self._loader(self.root / art.validate_model_name(name) / str(version))

    def publish(self, model: LoadedModel, versions: list[int]) -> int | None:
        """Serve `model` as its name's default version; returns the default it replaced (None: a new name).

        The replaced version unloads once its last call in flight ends (`release`); so does another
        object of `model`'s own version that `model` displaces (that version was loaded again).
        """
        with self._lock:
            old = self._latest.get(model.name)
            self._versions[model.name] = versions
            self._latest[model.name] = model.version
            dropped = self._install(model)
            self._errors.get(model.name, {}).pop(model.version, None)
            dropped += self._retire([(model.name, old)] if old not in (None, model.version) else [])
        self._unloaded(dropped)
        return old

    def remove(self, name: str) -> None:
        """Stop serving `name`: new requests get NOT_FOUND; its versions unload once their calls end."""
        with self._lock:
            self._latest.pop(name, None)
            self._versions.pop(name, None)
            self._errors.pop(name, None)
            dropped = self._retire([k for k in self._loaded if k[0] == name])
        self._unloaded(dropped)

    def record_error(self, name: str, version: int, reason: str) -> None:
        with self._lock:
            self._errors.setdefault(name, {})[version] = reason

    def load_errors(self, name: str) -> dict[int, str]:
        """Versions of `name` that were refused, with the reason, ascending."""
        with self._lock:
            return dict(sorted(self._errors.get(name, {}).items()))

    def loaded_versions(self) -> dict[tuple[str, int], int]:
        """(name, version) -> calls in flight, for every loaded version (served or draining); a version
        loaded again while its displaced object drains counts the calls on both."""
        with self._lock:
            models = {id(m): m for m in (*self._loaded.values(), *self._retiring.values())}
            counts: dict[tuple[str, int], int] = {}
            for mid, model in models.items():
                key = (model.name, model.version)
                counts[key] = counts.get(key, 0) + self._in_flight.get(mid, 0)
            return counts

    def acquire(self, name: str, version: int | None) -> LoadedModel | None:
        """The loaded model a call will use, counted as in flight until `release`; None if not loaded."""
        with self._lock:
            chosen = self._latest.get(name) if version is None else version
            if chosen is None:
                return None
            model = self._loaded.get((name, chosen))
            if model is not None:
                self._in_flight[id(model)] = self._in_flight.get(id(model), 0) + 1
            return model

    def release(self, model: LoadedModel) -> None:
        """End a call `acquire` counted on this very object; it unloads here if it was its last and it
        was retired meanwhile."""
        with self._lock:
            left = self._in_flight.get(id(model), 1) - 1
            if left > 0:
                self._in_flight[id(model)] = left
                dropped = []
            else:
                self._in_flight.pop(id(model), None)
                retired = self._retiring.get(id(model)) is model
                dropped = self._retire_object(model) if retired else []
        self._unloaded(dropped)

    def _install(self, model: LoadedModel) -> list[LoadedModel]:
        """Under the lock: `model` becomes what its (name, version) resolves to, and is not retiring; a
        different object it displaces retires (returned if idle, for `_unloaded`)."""
        key = (model.name, model.version)
        displaced = self._loaded.get(key)
        self._loaded[key] = model
        self._retiring.pop(id(model), None)
        return self._retire_object(displaced) if displaced is not None and displaced is not model else []

    def _retire(self, keys: list[tuple[str, int]]) -> list[LoadedModel]:
        """Under the lock: retire the objects these versions resolve to (`_retire_object`)."""
        dropped = []
        for key in keys:
            model = self._loaded.get(key)
            if model is not None:
                dropped += self._retire_object(model)
        return dropped

    def _retire_object(self, model: LoadedModel) -> list[LoadedModel]:
        """Under the lock: drop `model` now if no call uses it (returned, for `_unloaded`), else mark it
        to drop when its last call ends. A retiring object still resolved by its version stays
        reachable (a pinned call may still take it) until then."""
        if self._in_flight.get(id(model), 0) > 0:
            self._retiring[id(model)] = model
            return []
        self._retiring.pop(id(model), None)
        key = (model.name, model.version)
        if self._loaded.get(key) is model:
            del self._loaded[key]
        return [model]

    def _unloaded(self, dropped: list[LoadedModel]) -> None:
        for model in dropped:
            log.info("unloaded %s v%d", model.name, model.version)
            self.on_unload(model)
