"""Engine-step metrics: per-thread histograms lose nothing across threads and export as histograms."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nextchar.server.ops.metrics import Metrics, StepStats
from nextchar.server.ops.registry import LoadedModel


def test_threads_record_without_losing_steps() -> None:
    stats = StepStats()

    def work(rows: int) -> None:
        for _ in range(5000):
            stats.record(1e-4, rows)

    threads = [threading.Thread(target=work, args=(rows,)) for rows in (1, 2, 3, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    durations, seconds, sizes, rows = stats.totals()
    assert sum(durations) == sum(sizes) == 20_000 and rows == 5000 * (1 + 2 + 3 + 40)
    assert abs(seconds - 2.0) < 1e-9
    assert sizes[:4] == [5000, 5000, 5000, 0] and sizes[6] == 5000  # 1, 2, <=4 (3), <=64 (40)


def test_metered_engine_exports_histograms(tmp_path: Path) -> None:
    class Engine:
        vocab = ("a", "b")

        def step(self, tokens: np.ndarray, state: object) -> tuple[np.ndarray, object]:
            return np.zeros((*tokens.shape, 2), np.float32), state

    metrics = Metrics()

    def loader(version_dir: Path) -> LoadedModel:
        return LoadedModel(SimpleNamespace(name="m", version=1), Engine())

    model = metrics.metered(loader)(tmp_path / "m" / "1")
    assert model.engine.vocab == ("a", "b")  # everything but step passes through
    for batch in (1, 1, 8):
        model.engine.step(np.zeros((batch, 1), np.int64), None)
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("nextchar_batch_size_count", (("model", "m"),))] == 3
    assert samples[("nextchar_batch_size_sum", (("model", "m"),))] == 10
    assert samples[("nextchar_batch_size_bucket", (("le", "1.0"), ("model", "m")))] == 2
    assert samples[("nextchar_batch_size_bucket", (("le", "8.0"), ("model", "m")))] == 3
    assert samples[("nextchar_engine_step_duration_seconds_count", (("model", "m"),))] == 3
    assert samples[("nextchar_model_loads_total", (("model", "m"), ("result", "success")))] == 1
