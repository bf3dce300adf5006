"""Prometheus metrics of one server: a private CollectorRegistry, the metered engine, the HTTP endpoint."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from nextchar.server.core.artifact import ArtifactError
from nextchar.server.ops.registry import LoadedModel, Registry

log = logging.getLogger(__name__)

# Latency buckets from 50 µs (one small-model step) to 10 s (a long prompt on a loaded host).
_LATENCY = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The endpoint serves each connection on a thread of its own, and a connection that sends nothing (or half
# a request line) would hold its thread for ever: every read and write on a connection times out after
# METRICS_TIMEOUT_S, and at most METRICS_MAX_CONNECTIONS are served at once (more are closed as they are
# accepted), so callers cannot make it hold more threads than that. A scrape is one short request.
METRICS_TIMEOUT_S = 10.0
METRICS_MAX_CONNECTIONS = 64
_REFUSED_LOG_EVERY_S = 60.0  # one warning per minute at most, however many connections are refused


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
        # Engine steps run once per generated character: their histograms are kept lock-free per thread
        # (a prometheus Histogram takes a lock per bucket and sum, ~5 µs a step on a busy 2-core host).
        self.steps: dict[str, StepStats] = {}
        r.register(_StepCollector(self.steps))
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
            stats = self.steps.setdefault(name, StepStats())
            return LoadedModel(model.artifact, _MeteredEngine(model.engine, stats))

        return load


class StepStats:
    """Step durations and batch sizes of one model: a histogram per thread, summed when scraped.

    Each thread only ever adds to its own lists, so nothing is lost and nothing is locked on the hot path.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # taken once per thread, when it records its first step
        self._per_thread: list[list[Any]] = []

    def record(self, seconds: float, rows: int) -> None:
        acc = getattr(self._local, "acc", None)
        if acc is None:
            acc = self._local.acc = [[0] * (len(_LATENCY) + 1), 0.0, [0] * (len(_BATCH) + 1), 0]
            with self._lock:
                self._per_thread.append(acc)
        acc[0][bisect.bisect_left(_LATENCY, seconds)] += 1
        acc[1] += seconds
        acc[2][bisect.bisect_left(_BATCH, rows)] += 1
        acc[3] += rows

    def totals(self) -> tuple[list[int], float, list[int], int]:
        """(duration bucket counts, duration sum, batch-size bucket counts, rows sum), not cumulative."""
        with self._lock:
            accs = list(self._per_thread)
        durations, rows = [0] * (len(_LATENCY) + 1), [0] * (len(_BATCH) + 1)
        seconds = 0.0
        total_rows = 0
        for acc in accs:
            durations = [a + b for a, b in zip(durations, acc[0], strict=True)]
            rows = [a + b for a, b in zip(rows, acc[2], strict=True)]
            seconds += acc[1]
            total_rows += acc[3]
        return durations, seconds, rows, total_rows


class _MeteredEngine:
    """An Engine whose `step` is timed; everything else is the engine's own (attribute passthrough)."""

    def __init__(self, engine: Any, stats: StepStats) -> None:
        self._engine, self._stats = engine, stats

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        """tokens: int64[B, T] -> (logits float32[B, T, V], state), as Engine.step."""
        started = time.perf_counter()
        out = self._engine.step(tokens, state)
        self._stats.record(time.perf_counter() - started, tokens.shape[0])
        return out

    def generate(self, tokens: np.ndarray, state: Any, *params: np.ndarray) -> tuple[np.ndarray, Any]:
        """K chars per row in one call, as Engine.generate; timed as one step of tokens.shape[0] rows."""
        started = time.perf_counter()
        out = self._engine.generate(tokens, state, *params)
        self._stats.record(time.perf_counter() - started, tokens.shape[0])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    cumulative = list(itertools.accumulate(counts))
    pairs = [(floatToGoString(b), c) for b, c in zip(bounds, cumulative, strict=False)]
    return [*pairs, ("+Inf", cumulative[-1])]


class _StepCollector:
    def __init__(self, steps: dict[str, StepStats]) -> None:
        self._steps = steps

    def collect(self) -> Iterator[HistogramMetricFamily]:
        seconds = HistogramMetricFamily("nextchar_engine_step_duration_seconds", "One onnxruntime step",
                                        labels=["model"])
        rows = HistogramMetricFamily("nextchar_batch_size", "Rows per engine step (1 without batching)",
                                     labels=["model"])
        for name, stats in sorted(self._steps.items()):
            durations, total_s, sizes, total_rows = stats.totals()
            seconds.add_metric([name], _buckets(_LATENCY, durations), total_s)
            rows.add_metric([name], _buckets(_BATCH, sizes), total_rows)
        yield seconds
        yield rows


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
            self._httpd = _BoundedServer(host, port, METRICS_MAX_CONNECTIONS, METRICS_TIMEOUT_S)
        except OSError as e:
            raise OSError(f"cannot bind the metrics endpoint {host}:{port}: {e}") from None
        self._httpd.set_app(make_wsgi_app(metrics.registry))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="nextchar-metrics",
                                        daemon=True)
        self._thread.start()
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _Handler(WSGIRequestHandler):

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a line per scrape would drown the log (prometheus_client's own handler is silent too)."""


class _Deadline:
    """Hangs up `connection` after `seconds` unless `end()` came first; `end()` waits for a hang-up under
    way, so the socket is never shut down after it was closed (its descriptor may be another's by then)."""

    def __init__(self, connection: socket.socket, seconds: float) -> None:
        self._connection, self._lock, self._open = connection, threading.Lock(), True
        self._timer = threading.Timer(seconds, self._hang_up)
        self._timer.daemon = True
        self._timer.start()

    def _hang_up(self) -> None:
        with self._lock:
            if self._open:
                with contextlib.suppress(OSError):  # the caller went away meanwhile
                    self._connection.shutdown(socket.SHUT_RDWR)

    def end(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._open = False


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's threaded WSGI server, with a cap on the connections served at once."""

    daemon_threads = True  # a connection still being served never holds up stop()
    # socketserver's listen backlog is 5: a burst of connections beyond it waits out a 1 s SYN retry each.
    # Those past the cap are better accepted and closed at once.
    request_queue_size = METRICS_MAX_CONNECTIONS

    def __init__(self, host: str, port: int, max_connections: int, timeout_s: float) -> None:
        # IPv4 or IPv6, whichever `host` is (prometheus_client picks the family the same way).
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        self._max_connections, self._timeout_s = max_connections, timeout_s
        self._refused, self._refused_logged = 0, float("-inf")  # only touched by the accepting thread
        super().__init__((str(sockaddr[0]), port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close it now rather than start one more thread
            self._log_refused()
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # timeout_s bounds each read and write and the whole connection: a caller sending a byte now and
        # then, each within the read timeout, would otherwise keep its slot (and the cap full) for ever.
        request.settimeout(self._timeout_s)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        deadline = _Deadline(request, self._timeout_s)
        try:
            super().finish_request(request, client_address)
        finally:
            deadline.end()  # before socketserver closes the socket: a late hang-up never meets a reused fd

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that went quiet past the timeout, or went away, is not a fault of ours: no traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def _log_refused(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= _REFUSED_LOG_EVERY_S:
            log.warning("metrics endpoint: serving %d connections, the most at once; closed %d more at "
                        "accept since the last such line", self._max_connections, self._refused)
            self._refused, self._refused_logged = 0, now
