"""Hot reload on a real server process: a new version under load, refused versions, removal, Admin calls."""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from ops_harness import ServerProcess, scrape, value
from server_harness import ServerThread, free_port, run_cli, server_config, wait_until

from nextchar.client.client import NextCharClient
from nextchar.server.ops.reload import Change
from nextchar.v1 import admin_pb2
from nextchar.v1 import inference_pb2 as pb

STREAMS = 16
PROMPT = "o say"  # in the anthem's vocabulary and in the tiny models' (lower case, no capitals)
RELOAD_S = 0.5
SHORT = 400
LONG_S = 10.0  # the two long streams are sized to last about this long under the test's load


@dataclass
class Stream:
    started: float
    ended: float
    version: int
    chars: int


def _stream(stub, seed: int, n: int, done: list[Stream], errors: list[str],
            first: threading.Event | None = None) -> None:
    """One stream on the default version of `lstm`, its outcome recorded; `first` set at its first text."""
    request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt=PROMPT, max_new_chars=n,
                                 temperature=1.0, seed=seed)
    started = time.monotonic()
    try:
        messages = []
        for message in stub.GenerateStream(request, timeout=120):
            messages.append(message)
            if first is not None:
                first.set()
    except grpc.RpcError as e:
        errors.append(f"{e.code().name}: {e.details()}")
        return
    chars = sum(len(m.text) for m in messages[:-1])
    done.append(Stream(started, time.monotonic(), messages[-1].summary.model.version, chars))


def _stream_forever(stub, seed: int, stop: threading.Event, done: list[Stream], errors: list[str]) -> None:
    while not stop.is_set():
        _stream(stub, seed, SHORT, done, errors)


def test_new_version_under_16_streams(model_repo_copy: Path, export_tiny, tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(model_repo_copy, "--reload-interval", str(RELOAD_S), "--metrics-port", str(port),
                           "--max-concurrent", "64", "--max-new-chars", "20000",
                           log_path=tmp_path / "server.log")
    stop = threading.Event()
    done: list[Stream] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_stream_forever, args=(server.stub, i, stop, done, errors))
               for i in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(done) >= STREAMS, 60, "a first round of streams")
        # Long enough to outlast the swap (export + one poll + warm-up) on a fast or a loaded machine.
        per_stream_rate = SHORT / statistics.median(s.ended - s.started for s in done)
        long = int(min(20_000, max(2_000, per_stream_rate * LONG_S)))
        long_started = [threading.Event() for _ in range(2)]
        threads += [threading.Thread(target=_stream, args=(server.stub, 100 + i, long, done, errors, ev))
                    for i, ev in enumerate(long_started)]
        for t in threads[STREAMS:]:
            t.start()
        wait_until(lambda: all(ev.is_set() for ev in long_started), 60, "the long streams' first text")
        exporting = time.monotonic()  # v2 cannot exist before this: export renames it into place at the end
        export_tiny("lstm", repo=model_repo_copy, name="lstm", version=2, seed=7)
        exported = time.monotonic()

        def serving_v2() -> bool:
            reply = server.stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name="lstm")), timeout=10)
            return reply.model.version == 2

        wait_until(serving_v2, 30, "the new version to become the default")
        seen = time.monotonic()
        wait_until(lambda: sum(s.started > seen for s in done) >= STREAMS, 60, "a round of streams on v2")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    try:
        assert errors == []
        assert sorted(s.chars for s in done)[-2:] == [long, long]
        assert all(s.chars in (SHORT, long) for s in done)
        assert all(s.version == 2 for s in done if s.started > seen)  # new requests: the new version
        straddled = [s for s in done if s.started < exporting and s.ended > seen]
        assert sum(s.chars == long for s in straddled) == 2  # the long ones at least
        assert all(s.version == 1 for s in straddled)  # streams running at the swap finish on the old one
        metrics = scrape(port)
        assert value(metrics, "nextchar_model_loads_total", model="lstm", result="success") == 2
        assert value(metrics, "nextchar_model_loaded", model="lstm", version=2) == 1
        # Every stream has ended, so v1 was drained and unloaded.
        assert ("nextchar_model_loaded", (("model", "lstm"), ("version", "1"))) not in metrics
        print(f"\nv2 default {seen - exported:.2f}s after the export (reload interval {RELOAD_S}s); "
              f"{len(done)} streams, {len(straddled)} straddled the swap ({long}-char long streams)")
    finally:
        assert server.terminate() == 0


def _broken_copy(repo: Path, name: str, version: int, damage) -> Path:
    """Copy `name`/1 as `name`/`version` (manifest renumbered), damage it, then rename it into place."""
    staging = repo / name / f".staging-{version}"
    shutil.copytree(repo / name / "1", staging)
    manifest = staging / "manifest.json"
    data = json.loads(manifest.read_text())
    data["version"] = str(version)
    manifest.write_text(json.dumps(data))
    damage(staging, data)
    final = repo / name / str(version)
    staging.rename(final)
    return final


def _truncate(d: Path, data: dict) -> None:
    onnx = d / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])


def _wrong_sha(d: Path, data: dict) -> None:
    data["model_sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(data))


def test_corrupt_versions_are_refused_while_the_old_one_serves(model_repo_copy: Path, tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(model_repo_copy, "--reload-interval", str(RELOAD_S), "--metrics-port", str(port),
                           log_path=tmp_path / "server.log")
    stub = server.stub
    request = pb.GenerateRequest(model=pb.ModelRef(name="gru"), prompt="O say", max_new_chars=10)
    try:
        def errors(name: str) -> dict[int, str]:
            reply = stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name=name)), timeout=10)
            return {e.version: e.reason for e in reply.model.load_errors}

        _broken_copy(model_repo_copy, "gru", 2, _truncate)
        reason = wait_until(lambda: errors("gru").get(2), 30, "gru v2 to be refused")
        assert "model.onnx: size is" in reason and "truncated" in reason
        assert stub.Generate(request, timeout=30).summary.model.version == 1

        _broken_copy(model_repo_copy, "gru", 3, _wrong_sha)
        reason = wait_until(lambda: errors("gru").get(3), 30, "gru v3 to be refused")
        assert "sha256 is" in reason and "corrupt or replaced" in reason
        assert stub.Generate(request, timeout=30).summary.model.version == 1
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        assert [e.version for e in listed["gru"].load_errors] == [2, 3] and listed["gru"].version == 1
        assert list(listed["lstm"].load_errors) == []
        assert server.health("gru") == health_pb2.HealthCheckResponse.SERVING

        # A refused version is not retried until its files change: an explicit rescan changes nothing.
        rescan = server.admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=30)
        assert list(rescan.changes) == []
        metrics = scrape(port)
        assert value(metrics, "nextchar_model_loads_total", model="gru", result="failure") == 2
        assert value(metrics, "nextchar_model_loads_total", model="gru", result="success") == 1
        assert "refused gru v2" in server.log() and "refused gru v3" in server.log()
    finally:
        assert server.terminate() == 0


def test_removed_unloaded_and_reloaded_models(model_repo_copy: Path, tmp_path: Path) -> None:
    """Admin calls from loopback (no token configured); the watcher is off, so rescans are explicit."""
    server = ServerProcess(model_repo_copy, log_path=tmp_path / "server.log")
    stub, admin = server.stub, server.admin

    def generate(name: str, version: int = 0):
        ref = pb.ModelRef(name=name, version=version) if version else pb.ModelRef(name=name)
        return stub.Generate(pb.GenerateRequest(model=ref, prompt="O say", max_new_chars=5), timeout=30)

    try:
        shutil.rmtree(model_repo_copy / "rnn")
        result = run_cli("admin", "reload", "--server", server.admin_address)  # the CLI's Admin client
        assert result.returncode == 0 and result.stdout == "rnn: removed\n", result.stderr
        with pytest.raises(grpc.RpcError) as gone:
            generate("rnn")
        assert gone.value.code() is grpc.StatusCode.NOT_FOUND
        assert server.health("rnn") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "rnn" not in [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]

        admin.UnloadModel(admin_pb2.UnloadModelRequest(name="gru"), timeout=30)
        with pytest.raises(grpc.RpcError) as unloaded:
            generate("gru")
        assert unloaded.value.code() is grpc.StatusCode.NOT_FOUND
        assert list(admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=30).changes) == []
        result = run_cli("admin", "load", "gru", "--server", server.admin_address)
        assert result.returncode == 0 and result.stdout == "gru: serving v1\n", result.stderr
        assert generate("gru").summary.model.version == 1
        assert server.health("gru") == health_pb2.HealthCheckResponse.SERVING

        shutil.copytree(model_repo_copy / "lstm" / "1", model_repo_copy / "lstm" / ".2")
        manifest = model_repo_copy / "lstm" / ".2" / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"version": "1"', '"version": "2"'))
        (model_repo_copy / "lstm" / ".2").rename(model_repo_copy / "lstm" / "2")
        admin.LoadModel(admin_pb2.LoadModelRequest(name="lstm", version=1), timeout=60)  # pinned to v1
        assert list(admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=30).changes) == []
        assert generate("lstm").summary.model.version == 1
        assert admin.LoadModel(admin_pb2.LoadModelRequest(name="lstm"), timeout=60).model.version == 2
        assert generate("lstm").summary.model.version == 2 and generate("lstm", 1).summary.model.version == 1

        for bad, code in (("../lstm", grpc.StatusCode.INVALID_ARGUMENT), ("nope", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as refused:
                admin.LoadModel(admin_pb2.LoadModelRequest(name=bad), timeout=30)
            assert refused.value.code() is code, bad
    finally:
        assert server.terminate() == 0


def test_batched_stream_keeps_its_version_and_the_old_batcher_closes(make_server, model_repo_copy: Path,
                                                                     export_tiny) -> None:
    """In-process (to see the runner's batchers): a rescan during a batched stream; v1's batcher goes
    once the stream that used it ends."""
    server = make_server(model_repo_copy, batching="on", max_new_chars=20_000)
    registry = server.server.servicer.registry
    export_tiny("lstm", repo=model_repo_copy, name="lstm", version=2, seed=3)  # not seen: no watcher
    with NextCharClient(server.address, timeout=120) as c:
        old = c.generate_stream("lstm", PROMPT, 20_000, temperature=1.0, seed=1)
        pieces = iter(old)
        text = next(pieces)
        assert {b.core.engine.artifact.version for b in server.runner.batchers} == {1}
        changes = server.run(server.server.ops.reloader.rescan_async(), timeout=60)
        assert changes == [Change("lstm", "loaded", 2)]
        assert registry.loaded_versions()[("lstm", 1)] == 1  # v1 drains: the stream still holds it
        assert c.generate("lstm", PROMPT, 20, temperature=0).summary.version == 2
        text += "".join(pieces)
        assert len(text) == 20_000 and old.summary.version == 1
        wait_until(lambda: ("lstm", 1) not in registry.loaded_versions(), 30, "v1 to unload")
        assert {b.core.engine.artifact.version for b in server.runner.batchers} == {2}


def test_a_reload_between_lookup_and_admission_serves_the_new_default(model_repo_copy: Path,
                                                                      export_tiny) -> None:
    """A call that names no version looks up the default, then is admitted (Registry.acquire); a reload
    that lands between the two (forced here: the admission first publishes v2, and idle v1 unloads at
    once) must not fail it: it runs on the new default. Before, it got NOT_FOUND "was just unloaded"."""
    server = ServerThread(server_config(model_repo_copy))  # serving lstm v1
    export_tiny("lstm", repo=model_repo_copy, name="lstm", version=2)
    registry = server.server.servicer.registry
    real = registry.acquire

    def overtaken(name: str, version: int | None):
        if (name, version) == ("lstm", 1):
            registry.acquire = real  # once per arming
            registry.publish(registry.load("lstm", 2), [1, 2])
            assert ("lstm", 1) not in registry.loaded_versions()  # it had no call in flight: gone
        return real(name, version)

    try:
        with NextCharClient(server.address, timeout=30) as c:
            registry.acquire = overtaken
            assert c.generate("lstm", PROMPT, 5, seed=1).summary.version == 2
            registry.publish(registry.load("lstm", 1), [1, 2])  # v1 the default again, for the session
            registry.acquire = overtaken
            with c.session("lstm", n=1, text=PROMPT) as s:
                assert s.version == 2 and s.opened is not None and len(s.opened.predictions) == 1
            assert registry.acquire is real  # both calls were overtaken
    finally:
        registry.acquire = real
        server.stop()
