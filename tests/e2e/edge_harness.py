"""Tools of the edge tests: install, Node runs, a static file server for the page, headless chromium."""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlencode, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "client"
GENERATE_MJS = CLIENT_DIR / "js" / "generate.mjs"
RUN_CASES_MJS = ROOT / "tests" / "e2e" / "js" / "run_cases.mjs"
INSTALL_EDGE = ROOT / "scripts" / "install_edge.sh"
# Every step below is bounded: a hung node or browser fails the test instead of stalling the suite.
NODE_TIMEOUT_S = 60
BROWSER_TIMEOUT_S = 60
INSTALL_TIMEOUT_S = 900
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
    "--enable-logging=stderr", "--v=0",  # the page's console messages land in the log shown on failure
)


def install_edge(skip_browser: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGE_SKIP_BROWSER": "1" if skip_browser else "0"}
    return subprocess.run(
        ["bash", str(INSTALL_EDGE)], capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )


def run_node(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    """client/js/generate.mjs ARGS..."""
    return subprocess.run(
        [node, str(GENERATE_MJS), *args], capture_output=True, encoding="utf-8", timeout=NODE_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )


def node_cases(node: str, cases: dict | str, timeout: float = NODE_TIMEOUT_S) -> dict:
    """tests/e2e/js/cases.mjs on `cases` (or their JSON) in ONE node process (models by file path)."""
    payload = cases if isinstance(cases, str) else json.dumps(cases)
    done = subprocess.run([node, str(RUN_CASES_MJS)], input=payload, capture_output=True,
                          encoding="utf-8", timeout=timeout, check=False)
    assert done.returncode == 0, f"run_cases.mjs failed ({done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout)


class _Handler(SimpleHTTPRequestHandler):
    """client/ at /, the repository's client/ and tests/e2e/ at /client/ and /tests/e2e/, the model
    repository at /models/, posted inputs at /input/<id>; POST /report/<id> into a queue."""

    extensions_map = {  # noqa: RUF012 (the base class's API is a plain dict attribute)
        ".html": "text/html", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
        "": "application/octet-stream",
    }

    def translate_path(self, path: str) -> str:
        rel = unquote(urlsplit(path).path)
        if rel.startswith("/models/"):
            target = (self.server.models_dir / rel.removeprefix("/models/")).resolve()
            return str(target) if target.is_relative_to(self.server.models_dir) else "/nonexistent"
        if rel.startswith(("/client/", "/tests/e2e/")):
            target = (ROOT / rel.lstrip("/")).resolve()
            return str(target) if target.is_relative_to(ROOT) else "/nonexistent"
        return super().translate_path(path)

    def do_GET(self) -> None:
        if self.path.startswith("/input/"):
            body = self.server.inputs.get(self.path.removeprefix("/input/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.reports.put((self.path.removeprefix("/report/"), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # keep the test output readable
        pass


@dataclass(frozen=True)
class PageServer:
    url: str
    reports: queue.Queue
    inputs: dict[str, bytes]


@contextmanager
def serve_page(models_dir: Path) -> Iterator[PageServer]:
    """client/ and `models_dir` (as /models/) over HTTP on 127.0.0.1, on a free port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(CLIENT_DIR)))
    server.models_dir = models_dir.resolve()
    server.reports = queue.Queue()
    server.inputs = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield PageServer(f"http://127.0.0.1:{server.server_address[1]}", server.reports, server.inputs)
    finally:
        server.shutdown()
        server.server_close()


def open_page(chromium: str, server: PageServer, path: str, query: dict, profile: Path,
              timeout: float = BROWSER_TIMEOUT_S) -> dict:
    """Open `path?query` in headless chromium, with `report` added, and return what the page POSTs."""
    run_id = uuid.uuid4().hex  # a report from an earlier page (late, after its test gave up) is ignored
    url = f"{server.url}{path}?{urlencode({**query, 'report': f'/report/{run_id}'}, doseq=True)}"
    log = profile / "chromium.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while True:
            got, report = server.reports.get(timeout=max(0.0, deadline - time.monotonic()))
            if got == run_id:
                break
    except queue.Empty:
        pytest.fail(f"the page reported nothing in {timeout} s; chromium said:\n{log.read_text()[-3000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the browser and its helper processes, started above
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert report["state"] == "done", f"the page failed: {report.get('error')}"
    return report


def browser_cases(chromium: str, server: PageServer, cases: dict, profile: Path,
                  timeout: float = BROWSER_TIMEOUT_S) -> dict:
    """tests/e2e/js/cases.mjs on `cases` in ONE headless page (model paths are URLs on `server`)."""
    input_id = uuid.uuid4().hex
    server.inputs[input_id] = json.dumps(cases).encode()
    return open_page(chromium, server, "/tests/e2e/web/cases.html", {"input": f"/input/{input_id}"},
                     profile, timeout)
