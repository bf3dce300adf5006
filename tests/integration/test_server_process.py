"""`nextchar serve` as a process: no torch; SIGTERM drains, exit 0; bad settings or artifacts fail fast."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import ROOT, free_port, run_cli, wait_serving

from nextchar.client.client import NextCharClient
from nextchar.client.errors import NextCharError, Unavailable

# Runs the real console entry point and reports, at exit, which heavy modules the process loaded.
_SERVE = """
import atexit, sys
def report():
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnxruntime", "grpc"})
    print("LOADED=" + ",".join(loaded), file=sys.stderr, flush=True)
atexit.register(report)
from nextchar.client.cli import main
sys.exit(main(["serve"] + sys.argv[1:]))
"""


def _start(repo: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, "--model-repo", str(repo), "--host", "127.0.0.1", "--port", str(port),
         *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, f"127.0.0.1:{port}"


def test_serve_never_imports_torch_and_drains_on_sigterm(model_repo: Path) -> None:
    proc, address = _start(model_repo, "--grace-seconds", "60", "--max-new-chars", "100000")
    try:
        wait_serving(address)
        with NextCharClient(address, timeout=60) as c:
            assert c.generate("lstm", "O say", 20).summary.generated_chars == 20
            n = 20_000
            stream = c.generate_stream("rnn", "O say", n, temperature=1.0, seed=3)
            pieces = iter(stream)
            first = next(pieces)
            proc.send_signal(signal.SIGTERM)
            # New calls are refused from now on: UNAVAILABLE (draining, or already gone).
            with pytest.raises(Unavailable):
                c.generate("lstm", "O say", 5)
            text = first + "".join(pieces)
        assert len(text) == n and stream.summary.finish_reason == "length"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    loaded = next(line for line in err.splitlines() if line.startswith("LOADED="))
    assert loaded == "LOADED=grpc,onnxruntime", err  # onnxruntime served the models; torch never came in


def test_sigint_stops_an_idle_server_with_exit_0(model_repo: Path) -> None:
    proc, address = _start(model_repo)
    try:
        wait_serving(address)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


# As _SERVE, with every load of the version $STUCK_VERSION (e.g. lstm/2) busy for a minute (said on stderr):
# it loads the version again and again, so it is inside onnxruntime most of that time.
_SERVE_STUCK_LOAD = """
import os, sys, time
import nextchar.server.ops.registry as registry
real = registry.engine_loader
def stuck(*args, **kwargs):
    load = real(*args, **kwargs)
    def loader(version_dir):
        if f"{version_dir.parent.name}/{version_dir.name}" == os.environ["STUCK_VERSION"]:
            print("LOADING", version_dir, file=sys.stderr, flush=True)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                load(version_dir)
        return load(version_dir)
    return loader
registry.engine_loader = stuck
from nextchar.client.cli import main
sys.exit(main(["serve"] + sys.argv[1:]))
"""


def _add_version_2(repo: Path) -> None:
    staging = repo / "lstm" / ".2"
    shutil.copytree(repo / "lstm" / "1", staging)
    manifest = staging / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": "1"', '"version": "2"'))
    staging.rename(repo / "lstm" / "2")


@pytest.mark.parametrize("load", ["watcher", "on-demand"])
def test_sigterm_exits_within_the_grace_period_while_a_model_load_is_stuck(model_repo_copy: Path,
                                                                           load: str) -> None:
    """A model load still running at shutdown is abandoned: the process exits after the grace period,
    not after the load. Both kinds ran on thread pools the interpreter joins at exit: the watcher's
    on asyncio's default executor, a load a call triggers (a version not loaded yet) on the runner's."""
    import os
    import threading
    import time

    if load == "on-demand":
        _add_version_2(model_repo_copy)  # the default; version 1 loads when a call names it
    port = free_port()
    stuck = "lstm/2" if load == "watcher" else "lstm/1"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_STUCK_LOAD, "--model-repo", str(model_repo_copy), "--host", "127.0.0.1",
         "--port", str(port), "--admin-address", "127.0.0.1:0", "--grace-seconds", "1",
         "--reload-interval", "0.1" if load == "watcher" else "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "STUCK_VERSION": stuck},
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address)
        if load == "watcher":
            _add_version_2(model_repo_copy)
        else:  # a call for version 1, which its deadline ends while the load goes on
            def call() -> None:
                with NextCharClient(address, timeout=2) as c, contextlib.suppress(NextCharError):
                    c.generate("lstm", "O say", 5, version=1)

            threading.Thread(target=call, daemon=True).start()
        assert proc.stderr is not None
        stderr = proc.stderr
        loading = threading.Event()

        def watch() -> None:
            for line in stderr:
                if line.startswith("LOADING"):
                    loading.set()
                    return

        threading.Thread(target=watch, daemon=True).start()
        assert loading.wait(30), "the load never started"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0  # not SIGABRT: exiting under a thread inside onnxruntime aborted
    assert elapsed < 10, f"the process took {elapsed:.1f}s to exit with a grace of 1s (the load takes 60s)"


@pytest.mark.parametrize(("args", "env", "wanted"), [
    (["--model-repo", "/nonexistent"], {}, "--model-repo (env NEXTCHAR_MODEL_REPO): must be an existing"),
    ([], {}, "--model-repo (env NEXTCHAR_MODEL_REPO) is required"),
    ([], {"NEXTCHAR_MODEL_REPO": ".", "NEXTCHAR_PORT": "http"}, "env NEXTCHAR_PORT: cannot parse 'http'"),
    (["--port", "70000"], {}, "--port (env NEXTCHAR_PORT): must be an integer in [0, 65535]"),
    ([], {"NEXTCHAR_MAX_NEW_CHARS": "0"}, "--max-new-chars (env NEXTCHAR_MAX_NEW_CHARS): must be"),
    (["--variant", "fp16"], {}, "--variant (env NEXTCHAR_VARIANT): must be one of fp32, int8"),
    ([], {"NEXTCHAR_BATCHING": "sometimes"}, "env NEXTCHAR_BATCHING: cannot parse"),
])
def test_invalid_settings_exit_2_naming_the_setting(args: list[str], env: dict, wanted: str) -> None:
    repo = [] if "--model-repo" in args or "required" in wanted else ["--model-repo", "."]
    result = run_cli("serve", *repo, *args, env={"NEXTCHAR_MODEL_REPO": "", **env})
    assert result.returncode == 2, result.stderr
    assert wanted in result.stderr, result.stderr


def test_env_defaults_are_used(model_repo: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextchar.client.cli", "serve"], cwd=ROOT,
        env={**__import__("os").environ, "NEXTCHAR_MODEL_REPO": str(model_repo), "NEXTCHAR_HOST": "127.0.0.1",
             "NEXTCHAR_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_damaged_artifact_fails_fast_and_never_serves(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    manifest = repo / "gru" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model_sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    result = run_cli("serve", "--model-repo", str(repo), "--host", "127.0.0.1", "--port", str(free_port()))
    assert result.returncode == 1
    assert "gru/1/model.onnx: sha256 is" in result.stderr and "corrupt or replaced" in result.stderr


def test_an_empty_repository_fails_fast(tmp_path: Path) -> None:
    result = run_cli("serve", "--model-repo", str(tmp_path), "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 1 and "has no <name>/<version>/ models" in result.stderr
