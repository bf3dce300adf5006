"""The browser playground against a real server: Envoy's gRPC-Web filter, the bundled Connect client,
headless chromium driven by real key presses (tests/e2e/playground_driver.mjs over DevTools).

Needs node, npm and chromium (scripts/install_edge.sh installs chromium; the page's npm packages are
installed by scripts/playground.py from client/playground/package-lock.json); skips without them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("playground_driver.mjs")
TEXT = "O say c"
TOP_N = 10
DRIVER_TIMEOUT_S = 90


def _playground():
    spec = importlib.util.spec_from_file_location("playground", ROOT / "scripts" / "playground.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    node, chromium = shutil.which("node"), shutil.which("chromium")
    if node is None or shutil.which("npm") is None or chromium is None:
        pytest.skip("the playground test needs node, npm and chromium (scripts/install_edge.sh)")
    return node, chromium


@pytest.fixture(scope="module")
def grpc_server(model_repo: Path):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from server_harness import ServerThread, server_config

    server = ServerThread(server_config(model_repo))
    yield server
    server.stop()


def test_typing_updates_bars_a_completion_streams_and_errors_show(
    tools: tuple[str, str], grpc_server, tmp_path: Path,
) -> None:
    from nextchar.client.client import NextCharClient

    node, chromium = tools
    playground = _playground()
    playground.build_page(sys.executable)
    port = _free_port()
    envoy = playground.start_envoy(grpc_server.address, "127.0.0.1", port, tmp_path)
    try:
        done = subprocess.run(
            [node, "--experimental-websocket", "--no-warnings", str(DRIVER), chromium,
             f"http://127.0.0.1:{port}/?model=lstm", str(tmp_path / "profile"), TEXT],
            capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    finally:
        playground.stop(envoy)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout)
    with NextCharClient(grpc_server.address, timeout=30) as client:
        assert [k["text"] for k in seen["keystrokes"]] == [TEXT[:i] for i in range(1, len(TEXT) + 1)]
        for k in seen["keystrokes"]:
            best = client.predict_next("lstm", k["text"], TOP_N)
            assert [c for c, _ in k["bars"]] == [p.char for p in best]
            assert [p for _, p in k["bars"]] == pytest.approx([p.probability for p in best], abs=1e-9)
        reference = client.generate("lstm", TEXT, 300, temperature=0.8, top_k=10, top_p=0.95, seed=7)
        # The page's empty temperature field: absent, so the server's default (1), not greedy.
        default = client.generate("lstm", TEXT, 300, top_k=10, top_p=0.95, seed=7)
        greedy = client.generate("lstm", TEXT, 300, temperature=0.0)
    assert seen["completion"] == reference.text
    assert len(set(seen["lengths"])) >= 2, f"the completion arrived in one piece: {seen['lengths']}"
    assert "seed 7" in seen["summary"]
    assert seen["error"].startswith("INVALID_ARGUMENT: temperature"), seen["error"]
    seed_error = "INVALID_ARGUMENT: seed: must be an integer in [0, 2^64-1]"  # for 1e3, 1.5, 0x10, 2^64
    assert all(e.startswith(seed_error) for e in seen["seedErrors"]), seen["seedErrors"]
    assert default.text != greedy.text
    assert seen["defaultTemperature"] == default.text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
