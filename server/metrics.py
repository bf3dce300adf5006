"""Prometheus metrics of one server: a private CollectorRegistry, the metered engine, the HTTP endpoint."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from nextchar.server.artifact import ArtifactError
from nextchar.server.registry import LoadedModel, Registry

log = logging.getLogger(__name__)

# Latency buckets from 50 µs (one small-model step) to 10 s (a long prompt on a loaded host).
_LATENCY = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class RequestRecord:
    """What one finished call contributes to the metrics (built by server.reqlog)."""

    method: str                      # the RPC's short name, e.g. "GenerateStream"
    model: str                       # "" when the call named no known model
    code: str                        # the gRPC status code name, e.g. "OK", "NOT_FOUND"
    duration_s: float
    generated_chars: int = 0
    time_to_first_char_s: float | None = None


class Metrics:
    """Every nextchar_* metric, registered in a registry of its own so one process can hold many servers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("nextchar_requests", "Finished RPCs by method, model and status code",
                                ["method", "model", "code"], registry=r)
        self.request_seconds = Histogram("nextchar_request_duration_seconds", "RPC duration, arrival to end",
                                         ["method"], buckets=_LATENCY, registry=r)
        self.generated_chars = Counter("nextchar_generated_chars", "Characters generated", ["model"],
                                       registry=r)
        self.ttfc = Histogram("nextchar_time_to_first_char_seconds",
                              "Arrival to the first generated character (server side)", ["model"],
                              buckets=_LATENCY, registry=r)
        self.inter_char = Histogram("nextchar_inter_char_latency_seconds",
                                    "Gap between stream messages divided by the characters they carry",
                                    ["model"], buckets=_LATENCY, registry=r)
        self.active_streams = Gauge("nextchar_active_streams", "GenerateStream calls running", registry=r)
        self.step_seconds = Histogram("nextchar_engine_step_duration_seconds", "One onnxruntime step",
                                      ["model"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("nextchar_batch_size", "Rows per engine step (1 without batching)",
                                    ["model"], buckets=_BATCH, registry=r)
        self.loads = Counter("nextchar_model_loads", "Model version loads by result (success, failure)",
                             ["model", "result"], registry=r)

    def observe(self, rec: RequestRecord) -> None:
        self.requests.labels(rec.method, rec.model, rec.code).inc()
        self.request_seconds.labels(rec.method).observe(rec.duration_s)
        if rec.generated_chars:
            self.generated_chars.labels(rec.model).inc(rec.generated_chars)
        if rec.time_to_first_char_s is not None:
            self.ttfc.labels(rec.model).observe(rec.time_to_first_char_s)

    def watch(self, registry: Registry, runner: Any) -> None:
        """Gauges read at scrape time: loaded versions and their calls, calls in flight, batch queue."""
        self.registry.register(_StateCollector(registry, runner))

    def metered(self, loader: Callable[[Path], LoadedModel]) -> Callable[[Path], LoadedModel]:
        """Wrap a registry loader: count loads by result, and time every engine step of what it loads."""

        def load(version_dir: Path) -> LoadedModel:
            name = version_dir.parent.name
            try:
                model = loader(version_dir)
            except ArtifactError:
                self.loads.labels(name, "failure").inc()
                raise
            self.loads.labels(name, "success").inc()
            engine = _MeteredEngine(model.engine, self.step_seconds.labels(name),
                                    self.batch_size.labels(name))
            return LoadedModel(model.artifact, engine)

        return load


class _MeteredEngine:
    """An Engine whose `step` is timed; everything else is the engine's own (attribute passthrough)."""

    def __init__(self, engine: Any, seconds: Any, batch: Any) -> None:
        self._engine, self._seconds, self._batch = engine, seconds, batch

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """tokens: int64[B, T] -> (logits float32[B, T, V], state), as Engine.step."""
        started = time.perf_counter()
        out = self._engine.step(tokens, state)
        self._seconds.observe(time.perf_counter() - started)
        self._batch.observe(tokens.shape[0])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class _StateCollector:
    def __init__(self, registry: Registry, runner: Any) -> None:
        self._registry, self._runner = registry, runner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("nextchar_model_loaded", "1 per loaded version (serving or draining)",
                                   labels=["model", "version"])
        calls = GaugeMetricFamily("nextchar_model_calls_in_flight", "Calls using a model version",
                                  labels=["model", "version"])
        for (name, version), n in sorted(self._registry.loaded_versions().items()):
            loaded.add_metric([name, str(version)], 1)
            calls.add_metric([name, str(version)], n)
        yield loaded
        yield calls
        yield GaugeMetricFamily("nextchar_calls_in_flight", "Admitted model calls running",
                                value=self._runner.in_flight)
        yield GaugeMetricFamily("nextchar_queue_depth", "Generations waiting for a batch slot (batching on)",
                                value=sum(b.core.pending for b in self._runner.batchers))


class MetricsEndpoint:
    """GET /metrics over HTTP on (host, port), in a daemon thread, until `stop()`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as e:
            raise OSError(f"cannot bind the metrics endpoint {host}:{port}: {e}") from None
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(5)
