"""server.registry with a fake loader: on-demand versions load once, outside the lock that `cached` takes."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from nextchar.server.ops.registry import LoadedModel, ModelNotFoundError, Registry


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
