"""server.registry with a fake loader: on-demand versions load once, outside the lock that `cached` takes;
at most --max-loaded-versions of them stay loaded; a broken one is read once."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from nextchar.server.core.artifact import ArtifactError
from nextchar.server.ops.registry import FAILED_RETRY_S, LoadedModel, ModelNotFoundError, Registry


def _repo(tmp_path: Path) -> Path:
    for version in (1, 2, 3):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
    return tmp_path


class SlowLoader:
    """Loads instantly, except versions in `held`, which wait until `release` is set."""

    def __init__(self, held: set[int]) -> None:
        self.held, self.release, self.calls = held, threading.Event(), []
        self.started = threading.Event()

    def __call__(self, version_dir: Path) -> LoadedModel:
        version = int(version_dir.name)
        self.calls.append(version)
        if version in self.held:
            self.started.set()
            assert self.release.wait(10)
        artifact = SimpleNamespace(name=version_dir.parent.name, version=version, model_path=version_dir)
        return LoadedModel(artifact, engine=object())


def test_a_slow_on_demand_load_blocks_neither_cached_nor_other_versions(tmp_path: Path) -> None:
    loader = SlowLoader(held={1})
    registry = Registry(_repo(tmp_path), loader)
    registry.load_latest()
    assert registry.cached("m").version == 3 and registry.cached("m", 1) is None
    results: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: results.append(registry.get("m", 1))) for _ in range(3)]
    for t in threads:
        t.start()
    assert loader.started.wait(10)
    # While version 1 is loading: lookups answer at once, and another version loads independently.
    assert registry.cached("m").version == 3
    assert registry.get("m", 2).version == 2
    loader.release.set()
    for t in threads:
        t.join(10)
    assert [m.version for m in results] == [1, 1, 1] and len({id(m) for m in results}) == 1
    assert loader.calls.count(1) == 1  # three racing first requests, one load


def test_unknown_names_and_versions(tmp_path: Path) -> None:
    registry = Registry(_repo(tmp_path), SlowLoader(held=set()))
    registry.load_latest()
    with pytest.raises(ModelNotFoundError, match=r"model.name: no model named 'x' \(available: m\)"):
        registry.cached("x")
    wanted = r"model.version: model 'm' has no version 9 \(available: 1, 2, 3\)"
    with pytest.raises(ModelNotFoundError, match=wanted):
        registry.get("m", 9)
    (tmp_path / "m" / "9").mkdir()
    assert registry.get("m", 9).version == 9  # exported after start: found by the rescan


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _capped(tmp_path: Path, cap: int, versions: int = 5) -> tuple[Registry, list[int], Clock]:
    """A registry over m/1..m/`versions` (default: the highest) keeping `cap` other versions loaded;
    the versions it unloaded, in order."""
    for version in range(1, versions + 1):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
    clock = Clock()
    registry = Registry(tmp_path, SlowLoader(held=set()), max_loaded_versions=cap, clock=clock)
    registry.load_latest()
    unloaded: list[int] = []
    registry.on_unload = lambda m: unloaded.append(m.version)
    return registry, unloaded, clock


def _call(registry: Registry, version: int) -> None:
    """One request pinned to `version`, as the servicer makes it: look up, acquire, release."""
    model = registry.get("m", version)
    held = registry.acquire("m", model.version)
    assert held is model
    registry.release(held)


def _loaded(registry: Registry) -> list[int]:
    return sorted(v for _, v in registry.loaded_versions())


def test_versions_named_by_requests_beyond_the_cap_unload_least_recently_used_first(tmp_path: Path) -> None:
    registry, unloaded, _ = _capped(tmp_path, cap=2)
    for version in (1, 2, 1, 3):
        _call(registry, version)
    assert unloaded == [2] and _loaded(registry) == [1, 3, 5]  # 1 was used again after 2
    _call(registry, 4)
    _call(registry, 2)  # loaded again from disk
    assert unloaded == [2, 1, 3] and _loaded(registry) == [2, 4, 5]


def test_the_default_version_stays_whatever_the_cap(tmp_path: Path) -> None:
    registry, unloaded, _ = _capped(tmp_path, cap=0)
    _call(registry, 1)
    _call(registry, 5)
    assert unloaded == [1] and _loaded(registry) == [5]


def test_an_evicted_version_with_a_call_in_flight_unloads_when_the_call_ends(tmp_path: Path) -> None:
    registry, unloaded, _ = _capped(tmp_path, cap=1)
    held = registry.acquire("m", registry.get("m", 1).version)
    _call(registry, 2)
    _call(registry, 3)
    assert unloaded == [2] and _loaded(registry) == [1, 3, 5]  # 1 retired, not cut
    assert registry.acquire("m", 1) is held  # still reachable while it drains
    registry.release(held)
    registry.release(held)
    assert unloaded == [2, 1] and _loaded(registry) == [3, 5]


def test_a_version_looked_up_is_not_evicted_before_its_call_acquires_it(tmp_path: Path) -> None:
    registry, unloaded, clock = _capped(tmp_path, cap=0)
    first = registry.get("m", 1)
    second = registry.get("m", 2)  # loaded before the first request acquired its version
    assert unloaded == [] and registry.acquire("m", first.version) is first
    registry.release(first)
    assert unloaded == [1] and _loaded(registry) == [2, 5]  # 2 is still between lookup and call
    clock.now += 10  # a lookup never followed by a call (GetModel) protects it only briefly
    _call(registry, 5)
    assert unloaded == [1, 2] and second.version == 2


def test_a_failed_on_demand_load_is_remembered_until_its_files_change(tmp_path: Path) -> None:
    _repo(tmp_path)
    calls: list[int] = []

    def loader(version_dir: Path) -> LoadedModel:
        calls.append(int(version_dir.name))
        if (version_dir / "model.onnx").read_text() == "broken":
            raise ArtifactError(f"{version_dir / 'model.onnx'}: size is 6 bytes but the manifest says 9 "
                                f"(truncated or replaced); [Errno 13] '{tmp_path}'")
        artifact = SimpleNamespace(name=version_dir.parent.name, version=int(version_dir.name),
                                   model_path=version_dir)
        return LoadedModel(artifact, engine=object())

    for version in (1, 2, 3):
        (tmp_path / "m" / str(version) / "model.onnx").write_text("broken" if version == 2 else "good")
    registry = Registry(tmp_path, loader)
    registry.load_latest()
    for _ in range(3):
        with pytest.raises(ArtifactError) as refused:
            registry.get("m", 2)
        assert str(refused.value) == ("m/2/model.onnx: size is 6 bytes but the manifest says 9 (truncated or "
                                      "replaced); [Errno 13] '<model repository>'")
    assert calls == [3, 2]  # read once, not once per request
    (tmp_path / "m" / "2" / "model.onnx").write_text("fixed")
    assert registry.get("m", 2).version == 2 and calls == [3, 2, 2]


def test_a_failed_on_demand_load_is_tried_again_after_a_while(tmp_path: Path) -> None:
    """The cause may pass without the files changing (too many open files, memory): a remembered
    failure lasts FAILED_RETRY_S, not until the files change."""
    _repo(tmp_path)
    clock, failures = Clock(), [1]

    def loader(version_dir: Path) -> LoadedModel:
        if version_dir.name == "2" and failures:
            failures.pop()
            raise ArtifactError(f"{version_dir / 'model.onnx'}: unreadable: [Errno 24] Too many open files")
        artifact = SimpleNamespace(name="m", version=int(version_dir.name), model_path=version_dir)
        return LoadedModel(artifact, engine=object())

    registry = Registry(tmp_path, loader, clock=clock)
    registry.load_latest()
    with pytest.raises(ArtifactError, match="Too many open files"):
        registry.get("m", 2)
    with pytest.raises(ArtifactError, match="Too many open files"):
        registry.get("m", 2)  # remembered
    clock.now += FAILED_RETRY_S
    assert registry.get("m", 2).version == 2


def test_anothers_acquire_and_release_do_not_end_a_handouts_protection(tmp_path: Path) -> None:
    """Caller B looked version 2 up (not yet in flight) while caller A acquired and released it at once
    (refused right after admission): 2 stays loaded for B."""
    registry, unloaded, _ = _capped(tmp_path, cap=0)
    b = registry.get("m", 2)
    a = registry.acquire("m", registry.get("m", 2).version)  # A: its own lookup, then its call
    registry.release(a)
    assert unloaded == [] and registry.acquire("m", b.version) is b
    registry.release(b)


def test_load_errors_name_files_without_the_servers_paths(tmp_path: Path) -> None:
    registry = Registry(_repo(tmp_path), SlowLoader(held=set()))
    registry.load_latest()
    registry.record_error("m", 2, f"{tmp_path / 'm' / '2' / 'manifest.json'}: missing")
    assert registry.load_errors("m") == {2: "m/2/manifest.json: missing"}


def test_an_evicted_version_looked_up_again_while_draining_stays(tmp_path: Path) -> None:
    registry, unloaded, _ = _capped(tmp_path, cap=1)
    held = registry.acquire("m", registry.get("m", 1).version)
    _call(registry, 2)  # 1 is evicted, still draining
    again = registry.cached("m", 1)  # a new request for it, before its last call ends
    registry.release(held)
    assert again is held and registry.acquire("m", 1) is held  # not unloaded under that request
    assert unloaded == [2] and _loaded(registry) == [1, 5]
