"""The loaded models: (name, version | latest) -> a validated, warmed-up engine; versions load on demand."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextchar.server.core import artifact as art

log = logging.getLogger(__name__)

# Artifact -> engine. The default is server.engine.Engine.load; tests may pass their own.
EngineLoader = Callable[[art.Artifact], Any]
# Versions other than the defaults that stay loaded after requests named them (--max-loaded-versions),
# all models together: each costs its model's memory and its batcher threads, and any caller can name
# every version on disk. Four lets a few pinned clients (an A/B test, a rollback) skip the reload.
MAX_LOADED_VERSIONS = 4
# How long a version a lookup returned is safe from eviction before its call counts itself in flight
# (`acquire`, right after on the event loop): evicted in that gap, the call would fail NOT_FOUND for a
# version that exists. A lookup never followed by a call (GetModel) stops protecting it after this.
_HANDOUT_S = 2.0
# A version that failed to load on demand is refused from memory for this long at most (unless its files
# change first): long enough that a flood of requests naming it costs one read, short enough that a
# passing cause (too many open files, memory) does not keep it refused.
FAILED_RETRY_S = 30.0
# (file name, size, mtime_ns) of a version directory's entries: a version that failed to load on
# demand is read again only once something in it changed.
Signature = tuple[tuple[str, int, int], ...]


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


def signature(version_dir: Path) -> Signature:
    """What a version directory holds, cheaply (no file is read): () if it cannot be listed."""
    try:
        entries = sorted(version_dir.iterdir())
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in entries)
    except OSError:
        return ()


class Registry:
    """Every model of a repository. `load_latest()` loads each model's latest version (fail fast);
    other versions load the first time a request names them, and at most `max_loaded_versions` of
    those stay loaded (least recently used first out). Thread-safe: requests run in threads.
    """

    def __init__(self, root: Path, loader: Callable[[Path], LoadedModel],
                 max_loaded_versions: int = MAX_LOADED_VERSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self._loader = loader
        self._max_on_demand, self._clock = max_loaded_versions, clock
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
        # Versions loaded on demand (not a default: Admin LoadModel's version is its model's default, so
        # it is never evicted here), least recently used first; and when a lookup last handed one out.
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        # Lookups not yet followed by their call's acquire: (when the last was, how many).
        self._handed: dict[tuple[str, int], tuple[float, int]] = {}
        # Versions that failed to load on demand: the files as they were, and the caller's message.
        self._failed: dict[tuple[str, int], tuple[Signature, str, float]] = {}  # files, message, until

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
            key = (name, self._latest[name] if version is None else version)
            return self._handout(key, self._loaded.get(key))

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model `name` at `version` (None = the latest loaded at start); loads it on first use.

        Blocking (it may read and warm up an ONNX file): call it from a worker thread.
        """
        with self._lock:
            self._check_name(name)
            key = (name, self._latest[name] if version is None else version)
            hit = self._handout(key, self._loaded.get(key))
            if hit is not None:
                return hit
            gate = self._loading.setdefault(key, threading.Lock())
        # The disk work happens outside the registry lock: `cached` runs on the event loop and must
        # never wait for it. The per-version gate makes racing first requests load it only once.
        with gate:
            with self._lock:
                hit = self._handout(key, self._loaded.get(key))
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
                model = self._load_on_demand(name, key[1])
                # Never replace what is there: the reloader may have published this version meanwhile
                # (that object is served and kept), or removed the model (nothing of it is kept).
                with self._lock:
                    gone = name not in self._latest
                    kept = model if gone else self._loaded.setdefault(key, model)
                    dropped: list[LoadedModel] = []
                    if not gone:
                        self._handout(key, kept)  # before the eviction: this caller's version stays
                        dropped = self._evict_beyond_cap()
                if gone or kept is not model:
                    dropped.append(model)
                self._unloaded(dropped)
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

    def _load_on_demand(self, name: str, version: int) -> LoadedModel:
        """The loader's model, or ArtifactError with a message for the caller: it names files by model
        and version, never by the server's path (the log has that). A failure is remembered until the
        version's files change (or FAILED_RETRY_S passed), so requests naming a broken version do not read
        and hash it each time."""
        version_dir = self.root / name / str(version)
        files = signature(version_dir)
        with self._lock:
            failed = self._failed.get((name, version))
        if failed is not None and failed[0] == files and self._clock() < failed[2]:
            raise art.ArtifactError(failed[1])
        try:
            model = self._loader(version_dir)
        except art.ArtifactError as e:
            log.warning("refused %s v%d on demand: %s", name, version, e)
            message = self._public(name, version, e)
            # Until the files change; at most FAILED_RETRY_S, as the cause may pass (EMFILE, out of memory).
            with self._lock:
                self._failed[(name, version)] = (files, message, self._clock() + FAILED_RETRY_S)
            raise art.ArtifactError(message) from None
        log.info("loaded %s v%d on demand", name, version)
        with self._lock:
            self._failed.pop((name, version), None)
        return model

    def _public(self, name: str, version: int, reason: object) -> str:
        """`reason` as callers may read it: the version's files named from the repository (`m/2/...`),
        never by the server's own path."""
        text = str(reason).replace(str(self.root / name / str(version)), f"{name}/{version}")
        hides = self.root.is_absolute() and self.root.parent != self.root  # a bare "/" is every path
        return text.replace(str(self.root), "<model repository>") if hides else text

    # --- the cap on versions loaded on demand --------------------------------------------------------

    def _on_demand(self, key: tuple[str, int]) -> bool:
        """Under the lock: is `key` a version loaded on demand, counted by the cap (not retiring)?"""
        model = self._loaded.get(key)
        return model is not None and self._latest.get(key[0], key[1]) != key[1] \
            and id(model) not in self._retiring

    def _handout(self, key: tuple[str, int], model: LoadedModel | None) -> LoadedModel | None:
        """Under the lock: a lookup returns `model`; a version loaded on demand becomes the most recently
        used, protected from eviction until its call acquires it, and no longer retiring: one evicted
        while a call still ran is wanted again, so it stays rather than unload under this caller."""
        if model is not None and self._latest.get(key[0], key[1]) != key[1]:  # a served name, not its default
            if self._retiring.get(id(model)) is model:
                del self._retiring[id(model)]
            self._recent[key] = None
            self._recent.move_to_end(key)
            self._handed[key] = (self._clock(), self._handed.get(key, (0.0, 0))[1] + 1)
        return model

    def _evict_beyond_cap(self) -> list[LoadedModel]:
        """Under the lock: retire the least recently used versions loaded on demand while more than the
        cap are; an evicted version with calls in flight unloads once they end (`_retire_object`), so
        no running call is cut. Versions just handed out are skipped, so the cap may be passed briefly."""
        if len(self._recent) <= self._max_on_demand:  # every call's release comes here: nothing to do
            return []
        for key in [k for k in self._recent if not self._on_demand(k)]:
            del self._recent[key]
            self._handed.pop(key, None)
        excess = len(self._recent) - self._max_on_demand
        now, dropped = self._clock(), []
        for key in list(self._recent):
            if excess <= 0:
                break
            handed = self._handed.get(key)
            if handed is not None and now - handed[0] < _HANDOUT_S:
                continue
            excess -= 1
            del self._recent[key]
            self._handed.pop(key, None)
            dropped += self._retire_object(self._loaded[key])
        return dropped

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
            self._failed.pop((model.name, model.version), None)
            dropped += self._retire([(model.name, old)] if old not in (None, model.version) else [])
        self._unloaded(dropped)
        return old

    def remove(self, name: str) -> None:
        """Stop serving `name`: new requests get NOT_FOUND; its versions unload once their calls end."""
        with self._lock:
            self._latest.pop(name, None)
            self._versions.pop(name, None)
            self._errors.pop(name, None)
            for key in [k for k in self._failed if k[0] == name]:
                del self._failed[key]
            dropped = self._retire([k for k in self._loaded if k[0] == name])
        self._unloaded(dropped)

    def record_error(self, name: str, version: int, reason: str) -> None:
        """Remember why `version` was refused; callers see it (load_errors) without the server's paths."""
        with self._lock:
            self._errors.setdefault(name, {})[version] = self._public(name, version, reason)

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
                if (name, chosen) in self._recent:  # in flight now: retirement protects it from here on
                    self._recent.move_to_end((name, chosen))
                    # One lookup's call is in flight: its protection ends, not another's still on its way
                    # (clearing them all let a quick acquire and release evict a version handed out).
                    when, count = self._handed.get((name, chosen), (0.0, 1))
                    if count > 1:
                        self._handed[(name, chosen)] = (when, count - 1)
                    else:
                        self._handed.pop((name, chosen), None)
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
            dropped += self._evict_beyond_cap()  # a version over the cap may be idle now
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
