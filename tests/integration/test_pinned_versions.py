"""Versions a request names (ModelRef.version) on a real server: --max-loaded-versions bounds what stays
loaded and the batcher threads with it, a running call is never cut, and a broken version is read once
and reported without the server's paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest
from ops_harness import scrape, value
from server_harness import ServerThread, free_port, server_config, wait_until

from nextchar.client.client import NextCharClient
from nextchar.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from nextchar.v1 import inference_pb2 as pb


def _copy_version(repo: Path, name: str, version: int) -> Path:
    """`name`/1 again as `name`/`version` (manifest renumbered), renamed into place as export does."""
    staging = repo / name / f".staging-{version}"
    shutil.copytree(repo / name / "1", staging)
    manifest = staging / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": str(version)}))
    return staging.rename(repo / name / str(version))


def _truncate(version_dir: Path) -> None:
    onnx = version_dir / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])


def _generate(stub, version: int) -> pb.GenerateResponse:
    request = pb.GenerateRequest(model=pb.ModelRef(name="lstm", version=version), prompt="o say",
                                 max_new_chars=5)
    return stub.Generate(request, timeout=60)


def _loaded(server: ServerThread) -> list[int]:
    return sorted(v for name, v in server.server.servicer.registry.loaded_versions() if name == "lstm")


def _engines_with_batchers(server: ServerThread) -> int:
    return len({id(b.core.engine) for b in server.runner.batchers if b.core.closed is None})


def test_versions_named_by_requests_stay_within_the_cap(model_repo_copy: Path) -> None:
    for version in range(2, 7):
        _copy_version(model_repo_copy, "lstm", version)
    server = ServerThread(server_config(model_repo_copy, max_loaded_versions=2, model_instances=1))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.NextCharStub(channel)
            for version in range(1, 6):
                assert _generate(stub, version).summary.model.version == version
                # The default (6) and the two most recent others; only the versions loaded keep batchers.
                assert _loaded(server) == sorted({max(1, version - 1), version, 6})
                assert _engines_with_batchers(server) == min(version, 2)
            assert _generate(stub, 1).summary.model.version == 1  # unloaded earlier: loaded again
            assert _loaded(server) == [1, 5, 6]
    finally:
        server.stop()


def test_an_evicted_version_serves_its_running_session_to_the_end(model_repo_copy: Path) -> None:
    for version in (2, 3, 4):
        _copy_version(model_repo_copy, "lstm", version)
    server = ServerThread(server_config(model_repo_copy, max_loaded_versions=1))
    try:
        with NextCharClient(server.address, timeout=30) as client, \
                client.session("lstm", version=1, n=3) as session:
            assert len(session.append("o sa").predictions) == 3
            with grpc.insecure_channel(server.address) as channel:
                stub = inference_pb2_grpc.NextCharStub(channel)
                _generate(stub, 2)
                _generate(stub, 3)
            assert _loaded(server) == [1, 3, 4]  # 1 is over the cap but its session still runs
            assert len(session.append("y").predictions) == 3
        wait_until(lambda: _loaded(server) == [3, 4], 10, "version 1 to unload after its session")
    finally:
        server.stop()


def test_a_broken_version_is_read_once_and_reported_without_paths(model_repo_copy: Path) -> None:
    _truncate(_copy_version(model_repo_copy, "lstm", 2))
    _copy_version(model_repo_copy, "lstm", 3)
    metrics_port = free_port()
    server = ServerThread(server_config(model_repo_copy, metrics_port=metrics_port))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.NextCharStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    _generate(stub, 2)
                assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                details = refused.value.details()
                assert details.startswith("lstm/2/model.onnx: size is")
                assert str(model_repo_copy) not in details
            loads = scrape(metrics_port)  # read and hashed once, not once per request:
            assert value(loads, "nextchar_model_loads_total", model="lstm", result="failure") == 1

            shutil.copy(model_repo_copy / "lstm" / "1" / "model.onnx", model_repo_copy / "lstm" / "2")
            assert _generate(stub, 2).summary.model.version == 2  # its files changed: read again

            # A version the reloader refuses is listed (load_errors) without the server's paths too.
            _truncate(_copy_version(model_repo_copy, "lstm", 4))
            with grpc.insecure_channel(server.server.admin_address) as admin_channel:
                admin = admin_pb2_grpc.AdminStub(admin_channel)
                admin.ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=60)
            reply = stub.GetModel(pb.GetModelRequest(model=pb.ModelRef(name="lstm")), timeout=10)
            [error] = reply.model.load_errors
            assert error.version == 4 and error.reason.startswith("lstm/4/model.onnx: size is")
            assert str(model_repo_copy) not in error.reason
    finally:
        server.stop()
