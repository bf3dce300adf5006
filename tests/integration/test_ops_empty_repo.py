"""A server whose repository is still empty (or missing) with the watcher on: up and NOT_SERVING, no exit,
then SERVING once the first model is exported into the repository (what a pod does before its trainer ran).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import ROOT, START_TIMEOUT_S, free_port, nextchar_cmd, wait_until

from nextchar.server.edge.app import SERVICE_NAME
from nextchar.v1 import inference_pb2 as pb
from nextchar.v1 import inference_pb2_grpc

RELOAD_S = 0.3
STATUS = health_pb2.HealthCheckResponse


@pytest.mark.parametrize("missing", [False, True], ids=["empty", "missing"])
def test_server_waits_not_serving_for_a_model(model_repo: Path, tmp_path: Path, missing: bool) -> None:
    repo = tmp_path / "repo"
    if not missing:
        repo.mkdir()
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            nextchar_cmd("serve", "--model-repo", str(repo), "--host", "127.0.0.1", "--port", str(port),
                         "--admin-address", "127.0.0.1:0", "--reload-interval", str(RELOAD_S)),
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)

    def status(service: str = "") -> int | None:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()}"
        try:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None

    try:
        wait_until(lambda: status() is not None, START_TIMEOUT_S, "the health service to answer")
        assert status() == STATUS.NOT_SERVING and status(SERVICE_NAME) == STATUS.NOT_SERVING
        time.sleep(5 * RELOAD_S)  # several empty polls later: still running, still NOT_SERVING
        assert status() == STATUS.NOT_SERVING
        stub = inference_pb2_grpc.NextCharStub(channel)
        assert not stub.ListModels(pb.ListModelsRequest(), timeout=5).models

        # The export arrives as the exporter writes it: aside under a dot-name, then renamed into place.
        staging = repo / ".lstm-1.partial"
        shutil.copytree(model_repo / "lstm" / "1", staging)
        (repo / "lstm").mkdir()
        staging.rename(repo / "lstm" / "1")
        wait_until(lambda: status() == STATUS.SERVING, START_TIMEOUT_S, "SERVING after the first export")
        assert status(SERVICE_NAME) == STATUS.SERVING and status("lstm") == STATUS.SERVING
        reply = stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="o say",
                                                 max_new_chars=20, temperature=0.0), timeout=30)
        assert len(reply.text) == 20
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, log_path.read_text()


def test_without_the_watcher_an_empty_repository_still_fails_fast(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        nextchar_cmd("serve", "--model-repo", str(missing), "--host", "127.0.0.1", "--port", "0",
                     "--admin-address", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "--model-repo (env NEXTCHAR_MODEL_REPO): must be an existing directory" in result.stderr


def test_overall_health_follows_the_last_model_removed_and_served_again(model_repo: Path, tmp_path: Path,
                                                                        make_server) -> None:
    """When no model is left (the watcher saw it removed, or Admin unloaded it), the whole server and the
    NextChar service say NOT_SERVING (every call would be NOT_FOUND); SERVING again with a model."""
    from nextchar.v1 import admin_pb2, admin_pb2_grpc

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "lstm", repo / "lstm")
    server = make_server(repo, reload_interval=RELOAD_S)
    with grpc.insecure_channel(server.address) as channel, \
            grpc.insecure_channel(server.server.admin_address) as admin_channel:
        health = health_pb2_grpc.HealthStub(channel)
        admin = admin_pb2_grpc.AdminStub(admin_channel)

        def status(service: str = "") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        def overall() -> tuple[int, int]:
            return status(), status(SERVICE_NAME)

        assert overall() == (STATUS.SERVING, STATUS.SERVING)
        admin.UnloadModel(admin_pb2.UnloadModelRequest(name="lstm"), timeout=30)
        assert overall() == (STATUS.NOT_SERVING, STATUS.NOT_SERVING) and status("lstm") == STATUS.NOT_SERVING
        admin.LoadModel(admin_pb2.LoadModelRequest(name="lstm"), timeout=60)
        assert overall() == (STATUS.SERVING, STATUS.SERVING)

        aside = tmp_path / "lstm-aside"
        (repo / "lstm").rename(aside)  # the watcher's rescan removes the last model
        wait_until(lambda: status("lstm") == STATUS.NOT_SERVING, START_TIMEOUT_S, "lstm to be removed")
        assert overall() == (STATUS.NOT_SERVING, STATUS.NOT_SERVING)
        aside.rename(repo / "lstm")
        wait_until(lambda: status("lstm") == STATUS.SERVING, START_TIMEOUT_S, "lstm to be served again")
        assert overall() == (STATUS.SERVING, STATUS.SERVING)
