"""Hot reload: the repository watcher and the load / unload / rescan operations behind the Admin RPCs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nextchar.server.core import artifact as art
from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError, Registry, Signature, signature
from nextchar.server.scheduling.runner import ShuttingDownError
from nextchar.server.scheduling.threads import detached

log = logging.getLogger(__name__)

SetHealth = Callable[[str, bool], Awaitable[None]]


@dataclass(frozen=True)
class Change:
    """What a rescan or an Admin call did to one model."""

    name: str
    action: str        # "loaded", "removed" or "failed"
    version: int = 0
    reason: str = ""


class Reloader:
    """Keeps the registry in step with the repository. A new version is validated and warmed up
    (Registry.load) before it becomes the default (Registry.publish); a refused one is recorded with
    its reason and the current default keeps serving. Blocking methods run on daemon threads (detached).

    Shutdown closes it (close/stop): every later change is ShuttingDownError (UNAVAILABLE), and a load
    in progress is abandoned, not waited for; its model is never published."""

    def __init__(self, registry: Registry, set_health: SetHealth, interval_s: float) -> None:
        self.registry, self._set_health, self.interval_s = registry, set_health, interval_s
        self._lock = threading.Lock()                     # one rescan or Admin change at a time
        # A refused version is retried only once something in it changed (its signature), so a broken
        # export costs one log line, not one per poll.
        self._refused: dict[tuple[str, int], Signature] = {}
        self._unloaded: set[str] = set()                  # UnloadModel'd: the watcher leaves them alone
        self._pinned: dict[str, int] = {}                 # LoadModel with a version: served until unpinned
        # Guards `_closed` and every change to the registry, so none lands after close() returned.
        # Held only around in-memory changes, never across a load: close() never waits on one.
        self._gate = threading.Lock()
        self._closed = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    # --- the watcher ------------------------------------------------------------------------------

    def start(self) -> None:
        """Poll every `interval_s` seconds (0 = never) on the running loop."""
        if self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="nextchar-reload")

    def close(self) -> None:
        """Shutdown: refuse every later change and stop the watcher, without waiting for a load in
        progress (its thread runs on, but what it loads is dropped, not published)."""
        with self._gate:
            self._closed = True
        self._stop.set()
        if self._task is not None:
            self._task.cancel()  # abandons an awaited rescan: a load can take longer than the grace period

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # cancelled: ends at its current await, not after the load

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDownError("the server is shutting down: model changes are refused")

    async def _watch(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
                return
            try:
                await self.rescan_async()
            except Exception:  # a bug, not a bad artifact: log it and keep watching
                log.exception("repository rescan failed")

    async def rescan_async(self) -> list[Change]:
        self._check_open()
        try:
            changes = await detached(self.rescan)
        except art.ArtifactError as e:  # the repository itself went away: keep serving what is loaded
            log.warning("repository scan failed, keeping the loaded models: %s", e)
            return []
        await self.apply_health(changes)
        return changes

    async def apply_health(self, changes: list[Change]) -> None:
        if self._closed:  # shutting down: health stays NOT_SERVING
            return
        for c in changes:
            if c.action != "failed":
                await self._set_health(c.name, c.action == "loaded")

    # --- operations (blocking) --------------------------------------------------------------------

    def rescan(self) -> list[Change]:
        """Load new defaults, drop models gone from disk; the changes made (or refused), by name."""
        self._check_open()
        with self._lock:
            found = art.scan_repository(self.registry.root)
            changes: list[Change] = []
            for name in sorted(set(found) | set(self.registry.names())):
                if name in self._unloaded:
                    continue
                versions = found.get(name, [])
                if not versions:
                    with self._gate:
                        self._check_open()
                        self.registry.remove(name)
                    self._pinned.pop(name, None)
                    log.info("model %s is gone from the repository: removed", name)
                    changes.append(Change(name, "removed"))
                    continue
                pinned = self._pinned.get(name)
                candidates = [pinned] if pinned in versions else versions[::-1]
                changes += self._converge(name, candidates, versions)
            return changes

    def load(self, name: str, version: int | None) -> LoadedModel:
        """Serve `name` at `version` (pinned) or its highest version (unpinned); ArtifactError if broken.

        Always read from disk, even a version already loaded (the operator's way to reload it): the
        object it displaces unloads once its last call ends (Registry.publish)."""
        art.validate_model_name(name)
        self._check_open()
        with self._lock:
            versions = art.list_versions(self.registry.root, name)
            if not versions:
                raise ModelNotFoundError("name", f"no model named {name!r} in {str(self.registry.root)!r}")
            if version is not None and version not in versions:
                listed = ", ".join(map(str, versions))
                raise ModelNotFoundError("version", f"model {name!r} has no version {version} "
                                                    f"(available: {listed})")
            target = version if version is not None else versions[-1]
            model = self._load(name, target)  # raises before anything changes
            self._publish(model, versions)
            self._unloaded.discard(name)
            if version is None:
                self._pinned.pop(name, None)
            else:
                self._pinned[name] = version
            log.info("serving %s v%d (Admin LoadModel%s)", name, target, ", pinned" if version else "")
            return model

    def unload(self, name: str) -> None:
        """Stop serving `name` until LoadModel names it again."""
        art.validate_model_name(name)
        self._check_open()
        with self._lock, self._gate:
            self._check_open()
            if name not in self.registry.names():
                raise ModelNotFoundError("name", f"no model named {name!r} is being served")
            self._unloaded.add(name)
            self._pinned.pop(name, None)
            self.registry.remove(name)
            log.info("unloaded %s (Admin UnloadModel)", name)

    def _converge(self, name: str, candidates: list[int], versions: list[int]) -> list[Change]:
        """Serve the first candidate that loads; stop at the one already served."""
        current = self.registry.cached(name) if name in self.registry.names() else None
        changes = []
        for version in candidates:
            if current is not None and version == current.version:
                break
            files = signature(self.registry.root / name / str(version))
            if self._refused.get((name, version)) == files:
                continue  # refused before and unchanged since
            # A version already loaded (asked for by number earlier) is served as it is, not loaded twice.
            model = self.registry.cached(name, version) if current is not None else None
            try:
                model = model or self._load(name, version)
            except art.ArtifactError as e:
                self._refused[(name, version)] = files
                changes.append(Change(name, "failed", version, str(e)))
                continue
            self._publish(model, versions)
            log.info("serving %s v%d (was %s)", name, version, f"v{current.version}" if current else "new")
            changes.append(Change(name, "loaded", version))
            break
        return changes

    def _publish(self, model: LoadedModel, versions: list[int]) -> None:
        """Serve `model`, unless shutdown began while it loaded (then ShuttingDownError; it is dropped)."""
        with self._gate:
            if self._closed:
                log.info("dropped %s v%d: loaded after shutdown began", model.name, model.version)
            self._check_open()
            self.registry.publish(model, versions)

    def _load(self, name: str, version: int) -> LoadedModel:
        try:
            return self.registry.load(name, version)
        except art.ArtifactError as e:
            self.registry.record_error(name, version, str(e))
            log.warning("refused %s v%d, the served version stays: %s", name, version, e)
            raise
