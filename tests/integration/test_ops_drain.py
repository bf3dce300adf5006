"""Graceful drain of a real server process: SIGTERM during 8 live streams."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ops_harness import ServerProcess
from server_harness import wait_until

from nextchar.v1 import inference_pb2 as pb

STREAMS, CHARS = 8, 3000


def test_sigterm_lets_8_live_streams_finish_refuses_new_calls_and_exits_0(model_repo: Path,
                                                                          tmp_path: Path) -> None:
    server = ServerProcess(model_repo, "--grace-seconds", "120", "--max-new-chars", str(CHARS),
                           log_path=tmp_path / "server.log")
    results: list[tuple[int, int] | str] = []
    live = [threading.Event() for _ in range(STREAMS)]

    def stream(i: int) -> None:
        request = pb.GenerateRequest(model=pb.ModelRef(name=("lstm", "gru")[i % 2]), prompt="O say",
                                     max_new_chars=CHARS, temperature=1.0, seed=i)
        try:
            chars = 0
            for message in server.stub.GenerateStream(request, timeout=120):
                live[i].set()
                if message.HasField("summary"):
                    results.append((chars, message.summary.finish_reason))
                chars += len(message.text)
        except grpc.RpcError as e:
            results.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: all(ev.is_set() for ev in live), 60, "text from all 8 streams")
        assert not results, "a stream ended before SIGTERM: make CHARS larger"
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> str | None:
            health = health_pb2_grpc.HealthStub(server.channel)
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError as e:
                return e.code().name  # already gone: not reachable is also not serving
            return None if status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"

        assert wait_until(refused, 30, "health to leave SERVING")
        with pytest.raises(grpc.RpcError) as new_call:
            server.stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                    max_new_chars=5), timeout=30)
        assert new_call.value.code() is grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(120)
        assert results == [(CHARS, pb.FINISH_REASON_LENGTH)] * STREAMS
        assert server.proc.wait(60) == 0
    finally:
        server.close()


LONG = 100_000  # a generation that is still running when the grace period ends (its client never reads)


def test_shutdown_abandons_a_watcher_load_and_refuses_admin_changes_while_draining(
        model_repo_copy: Path) -> None:
    """A rescan loading a new version when shutdown begins delays neither the drain nor the end of
    shutdown (grace, not load time + grace), its model is never published; Admin changes during the
    drain are UNAVAILABLE, as are new calls, while a running call gets the grace period."""
    import shutil
    import time

    from server_harness import ServerThread, server_config

    from nextchar.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

    grace = 2.0
    server = ServerThread(server_config(model_repo_copy, reload_interval=0.1, max_new_chars=LONG))
    registry = server.server.servicer.registry
    load, entered, gate, returned = registry._loader, threading.Event(), threading.Event(), threading.Event()

    def slow(version_dir: Path):  # a load that takes as long as the test wants (bounded)
        entered.set()
        gate.wait(20)
        try:
            return load(version_dir)
        finally:
            returned.set()

    registry._loader = slow
    channel = grpc.insecure_channel(server.address)
    admin_channel = grpc.insecure_channel(server.server.admin_address)
    try:
        stub, admin = inference_pb2_grpc.NextCharStub(channel), admin_pb2_grpc.AdminStub(admin_channel)
        running = stub.GenerateStream(pb.GenerateRequest(model=pb.ModelRef(name="rnn"), prompt="O say",
                                                         max_new_chars=LONG, temperature=1.0), timeout=60)
        assert next(running).text  # running, and from now on never read

        staging = model_repo_copy / "lstm" / ".2"
        shutil.copytree(model_repo_copy / "lstm" / "1", staging)
        manifest = staging / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"version": "1"', '"version": "2"'))
        staging.rename(model_repo_copy / "lstm" / "2")
        assert entered.wait(30), "the watcher never started loading lstm v2"

        started = time.monotonic()
        shutdown = server.submit(server.server.shutdown(grace))
        wait_until(lambda: server.runner.draining, 5, "the drain to begin", interval=0.01)
        for change in (lambda: admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=5),
                       lambda: admin.LoadModel(admin_pb2.LoadModelRequest(name="gru"), timeout=5),
                       lambda: admin.UnloadModel(admin_pb2.UnloadModelRequest(name="gru"), timeout=5)):
            with pytest.raises(grpc.RpcError) as refused:
                change()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()
        with pytest.raises(grpc.RpcError) as new_call:
            stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                             max_new_chars=5), timeout=5)
        assert new_call.value.code() is grpc.StatusCode.UNAVAILABLE
        assert server.runner.in_flight == 1  # the running call still has its grace period

        assert shutdown.result(grace + 10) is False  # the unread stream ran out the grace period
        elapsed = time.monotonic() - started
        assert elapsed < grace + 0.5, f"shutdown took {elapsed:.2f}s with a grace of {grace}s"
        gate.set()
        assert returned.wait(30)
        time.sleep(0.3)  # time enough to publish, were it going to
        assert registry.cached("lstm").version == 1 and registry.versions("lstm") == [1]
    finally:
        gate.set()
        channel.close()
        admin_channel.close()
        server.stop()
