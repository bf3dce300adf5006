"""Registry lifecycle and the Reloader's decisions, with a fake loader over real directories (no ONNX)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from nextchar.server.core.artifact import ArtifactError
from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError, Registry
from nextchar.server.ops.reload import Change, Reloader


def _loader(calls: list[tuple[str, int]]):
    def load(version_dir: Path) -> LoadedModel:
        name, version = version_dir.parent.name, int(version_dir.name)
        calls.append((name, version))
        if (version_dir / "BROKEN").exists():
            raise ArtifactError(f"{version_dir}/model.onnx: size is 3 bytes but the manifest says 9 "
                                "(truncated or replaced)")
        artifact = SimpleNamespace(name=name, version=version, model_path=version_dir / "model.onnx")
        return LoadedModel(artifact, engine=object())
    return load


def _version(repo: Path, name: str, version: int, broken: bool = False) -> Path:
    d = repo / name / str(version)
    d.mkdir(parents=True)
    if broken:
        (d / "BROKEN").write_text("x")
    return d


@pytest.fixture
def setup(tmp_path: Path):
    _version(tmp_path, "a", 1)
    _version(tmp_path, "b", 1)
    calls: list[tuple[str, int]] = []
    registry = Registry(tmp_path, _loader(calls))
    registry.load_latest()
    unloaded: list[tuple[str, int]] = []
    dropped: list[LoadedModel] = []  # the very objects unloaded, in order (identity matters)

    def on_unload(m: LoadedModel) -> None:
        unloaded.append((m.name, m.version))
        dropped.append(m)

    registry.on_unload = on_unload
    health: list[tuple[str, bool]] = []

    async def set_health(name: str, serving: bool) -> None:
        health.append((name, serving))

    return SimpleNamespace(repo=tmp_path, registry=registry, calls=calls, unloaded=unloaded, dropped=dropped,
                           health=health,
                           reloader=Reloader(registry, set_health, interval_s=0))


def test_a_busy_version_unloads_only_when_its_last_call_ends(setup) -> None:
    r = setup.registry
    v1 = r.acquire("a", None)
    second = r.acquire("a", 1)
    _version(setup.repo, "a", 2)
    assert setup.reloader.rescan() == [Change("a", "loaded", 2)]
    assert r.cached("a").version == 2 and r.acquire("a", None).version == 2
    assert r.loaded_versions()[("a", 1)] == 2 and setup.unloaded == []  # draining: still loaded
    r.release(v1)
    assert setup.unloaded == []
    r.release(second)
    assert setup.unloaded == [("a", 1)] and ("a", 1) not in r.loaded_versions()


def test_an_idle_version_unloads_at_once_and_errors_are_recorded_once(setup) -> None:
    _version(setup.repo, "a", 2, broken=True)
    _version(setup.repo, "a", 3, broken=True)
    changes = setup.reloader.rescan()
    assert [(c.action, c.version) for c in changes] == [("failed", 3), ("failed", 2)]
    assert "truncated" in changes[0].reason
    assert sorted(setup.registry.load_errors("a")) == [2, 3] and setup.registry.cached("a").version == 1
    calls = len(setup.calls)
    assert setup.reloader.rescan() == [] and len(setup.calls) == calls  # unchanged: not retried
    (setup.repo / "a" / "3" / "BROKEN").unlink()  # fixed on disk: retried and served
    assert setup.reloader.rescan() == [Change("a", "loaded", 3)]
    assert setup.unloaded == [("a", 1)] and sorted(setup.registry.load_errors("a")) == [2]


def test_removed_and_unloaded_models_are_not_found_and_health_follows(setup) -> None:
    shutil.rmtree(setup.repo / "b")
    changes = asyncio.run(setup.reloader.rescan_async())
    assert changes == [Change("b", "removed")] and setup.health == [("b", False)]
    with pytest.raises(ModelNotFoundError):
        setup.registry.cached("b")
    setup.reloader.unload("a")
    assert setup.registry.names() == [] and setup.reloader.rescan() == []  # unload is sticky
    assert setup.reloader.load("a", None).version == 1 and setup.registry.names() == ["a"]
    with pytest.raises(ModelNotFoundError):
        setup.reloader.unload("b")


def test_a_pinned_version_stays_until_unpinned(setup) -> None:
    _version(setup.repo, "a", 2)
    assert setup.reloader.load("a", 1).version == 1
    assert setup.reloader.rescan() == []
    assert setup.reloader.load("a", None).version == 2
    with pytest.raises(ModelNotFoundError):
        setup.reloader.load("a", 9)
    _version(setup.repo, "a", 3, broken=True)
    with pytest.raises(ArtifactError):
        setup.reloader.load("a", 3)
    assert setup.registry.cached("a").version == 2 and 3 in setup.registry.load_errors("a")


def test_the_watcher_polls_and_stops() -> None:
    async def run(tmp: Path) -> list:
        _version(tmp, "a", 1)
        registry = Registry(tmp, _loader([]))
        registry.load_latest()
        seen: list[tuple[str, bool]] = []

        async def set_health(name: str, serving: bool) -> None:
            seen.append((name, serving))

        reloader = Reloader(registry, set_health, interval_s=0.01)
        reloader.start()
        _version(tmp, "a", 2)
        for _ in range(500):  # bounded: at most 5 s of 10 ms polls
            if registry.cached("a").version == 2:
                break
            await asyncio.sleep(0.01)
        await reloader.stop()
        return seen

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert asyncio.run(run(Path(d))) == [("a", True)]


def test_a_version_loaded_on_demand_is_reused_when_it_becomes_the_default(setup) -> None:
    _version(setup.repo, "a", 2)
    setup.reloader.rescan()
    older = setup.registry.get("a", 1)  # loaded again on demand after v2 replaced it
    calls = len(setup.calls)
    shutil.rmtree(setup.repo / "a" / "2")  # the default is deleted: fall back to v1, already loaded
    assert setup.reloader.rescan() == [Change("a", "loaded", 1)]
    assert setup.registry.cached("a") is older and len(setup.calls) == calls
    assert ("a", 2) in setup.unloaded


# --- a key published again with a different object: the old object unloads once, when idle ----------


def _same(objects: list[LoadedModel], *expected: LoadedModel) -> bool:
    return len(objects) == len(expected) and all(a is b for a, b in zip(objects, expected, strict=True))


def test_loading_the_served_version_again_unloads_the_old_object_at_once_when_idle(setup) -> None:
    r = setup.registry
    old = r.cached("a")
    new = setup.reloader.load("a", None)  # Admin LoadModel a: loaded again from disk
    assert new is not old and r.cached("a") is new
    assert _same(setup.dropped, old)  # idle: unloaded at once, exactly once
    assert r.loaded_versions() == {("a", 1): 0, ("b", 1): 0}
    setup.reloader.load("a", 1)
    assert len(setup.dropped) == 2 and setup.dropped[1] is new


def test_loading_the_served_version_again_while_busy_unloads_the_old_one_at_its_last_release(setup) -> None:
    r = setup.registry
    old = r.acquire("a", None)
    new = setup.reloader.load("a", 1)
    assert new is not old and setup.dropped == []  # in use: not unloaded
    assert r.acquire("a", None) is new and r.acquire("a", 1) is new  # new calls get the new object
    assert r.loaded_versions()[("a", 1)] == 3  # the draining object is still counted as loaded
    r.release(new)
    r.release(new)
    assert setup.dropped == []  # the new object's count is its own
    r.release(old)
    assert _same(setup.dropped, old)
    assert r.loaded_versions()[("a", 1)] == 0 and r.cached("a") is new
    r.release(old)  # a stray second release unloads nothing more
    assert _same(setup.dropped, old)


def test_unload_then_load_while_a_call_runs_unloads_the_old_object_at_its_release(setup) -> None:
    r = setup.registry
    old = r.acquire("a", None)  # a stream running on it
    setup.reloader.unload("a")
    assert setup.dropped == []
    new = setup.reloader.load("a", None)
    assert new is not old and r.cached("a") is new and setup.dropped == []
    r.release(old)
    assert _same(setup.dropped, old)
    held = r.acquire("a", None)
    r.release(held)
    assert held is new and _same(setup.dropped, old)  # the served one stays


def test_a_model_directory_that_comes_back_unloads_the_old_object_at_its_release(setup, tmp_path) -> None:
    r = setup.registry
    old = r.acquire("a", None)
    aside = tmp_path.parent / f"{tmp_path.name}-aside"
    (setup.repo / "a").rename(aside)
    assert setup.reloader.rescan() == [Change("a", "removed")] and setup.dropped == []
    aside.rename(setup.repo / "a")
    assert setup.reloader.rescan() == [Change("a", "loaded", 1)]
    new = r.cached("a")
    assert new is not old and setup.dropped == []
    r.release(old)
    assert _same(setup.dropped, old) and r.cached("a") is new
    assert setup.reloader.rescan() == [] and _same(setup.dropped, old)


def test_an_on_demand_load_never_replaces_a_version_published_meanwhile(setup) -> None:
    r = setup.registry
    _version(setup.repo, "a", 2)
    setup.reloader.rescan()  # a v2 is the default; a v1 unloaded
    assert setup.unloaded == [("a", 1)]
    gate, started = threading.Event(), threading.Event()
    load = r._loader
    first = [True]

    def slow(version_dir: Path) -> LoadedModel:
        if version_dir.name == "1" and first[0]:  # only the on-demand load waits
            first[0] = False
            started.set()
            assert gate.wait(10)
        return load(version_dir)

    r._loader = slow
    got: list[LoadedModel] = []
    t = threading.Thread(target=lambda: got.append(r.get("a", 1)))
    t.start()
    assert started.wait(10)
    published = setup.reloader.load("a", 1)  # Admin pins v1 while the on-demand load runs
    gate.set()
    t.join(10)
    assert got == [published] and got[0] is published  # the served object, not a second one
    assert r.cached("a", 1) is published and r.cached("a") is published
    duplicate = setup.dropped[-1]
    assert duplicate is not published and (duplicate.name, duplicate.version) == ("a", 1)
    assert setup.unloaded == [("a", 1), ("a", 2), ("a", 1)]  # old v1, replaced v2, the duplicate: once each
    held = r.acquire("a", 1)
    r.release(held)
    assert held is published and len(setup.dropped) == 3


def _gated_loads(registry) -> tuple[threading.Event, threading.Event]:
    """Make `registry`'s loads wait for the returned gate; `started` is set when one is waiting."""
    gate, started = threading.Event(), threading.Event()
    load = registry._loader

    def slow(version_dir: Path) -> LoadedModel:
        started.set()
        assert gate.wait(10)
        return load(version_dir)

    registry._loader = slow
    return gate, started


def test_an_on_demand_load_of_a_model_removed_meanwhile_is_not_kept(setup) -> None:
    r = setup.registry
    _version(setup.repo, "a", 2)
    gate, started = _gated_loads(r)
    errors: list[Exception] = []

    def get() -> None:
        try:
            r.get("a", 2)
        except ModelNotFoundError as e:
            errors.append(e)

    t = threading.Thread(target=get)
    t.start()
    assert started.wait(10)
    setup.reloader.unload("a")
    gate.set()
    t.join(10)
    assert len(errors) == 1 and errors[0].field == "model.name"
    assert setup.unloaded == [("a", 1), ("a", 2)]  # the default, then the fresh v2: nothing left loaded
    assert ("a", 2) not in r.loaded_versions()


def test_a_closed_reloader_refuses_changes_and_never_publishes_a_load_in_progress(setup) -> None:
    from nextchar.server.scheduling.runner import ShuttingDownError

    r = setup.registry
    _version(setup.repo, "a", 2)
    gate, started = _gated_loads(r)
    errors: list[BaseException] = []

    def rescan() -> None:
        try:
            setup.reloader.rescan()
        except ShuttingDownError as e:
            errors.append(e)

    t = threading.Thread(target=rescan)
    t.start()
    assert started.wait(10)
    setup.reloader.close()  # shutdown begins during the load: returns at once
    for change in (setup.reloader.rescan, lambda: setup.reloader.load("b", None),
                   lambda: setup.reloader.unload("b")):
        with pytest.raises(ShuttingDownError, match="shutting down"):
            change()
    gate.set()
    t.join(10)
    assert len(errors) == 1 and r.cached("a").version == 1 and r.names() == ["a", "b"]
    assert r.versions("a") == [1]
