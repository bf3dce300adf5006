"""curl through Envoy's gRPC-JSON transcoder (deploy/envoy-json.yaml, run by scripts/json_gateway.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from server_harness import ROOT, free_port, wait_until

from nextchar.client.client import NextCharClient

PROMPT = "O say can you see"


@pytest.fixture(scope="module")
def curl() -> str:
    found = shutil.which("curl")
    assert found, "curl is missing: apt-get install curl"
    return found


@pytest.fixture(scope="module")
def gateway(server) -> Iterator[str]:
    """The local recipe of docs/api.md, on free ports: `scripts/json_gateway.py run`."""
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, ROOT / "scripts" / "json_gateway.py", "run", "--upstream",
                             server.address, "--port", str(port), "--admin-port", str(admin)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:  # Envoy's admin /ready: 200 once its listeners are up
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_until(ready, 60, "Envoy to be ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _curl(curl: str, url: str, body: dict) -> tuple[int, dict | list | str]:
    """(HTTP status, the JSON body; the text when the body is not JSON)."""
    run = subprocess.run([curl, "-s", "--max-time", "30", "-w", "\n%{http_code}", "-H",
                          "content-type: application/json", "-d", json.dumps(body), url],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text, _, code = run.stdout.rpartition("\n")
    try:
        return int(code), json.loads(text)
    except ValueError:
        return int(code), text


def test_generate_returns_json(curl: str, gateway: str, server) -> None:
    body = {"model": {"name": "lstm"}, "prompt": PROMPT, "max_new_chars": 60, "temperature": 0.9, "seed": 5}
    code, reply = _curl(curl, f"{gateway}/nextchar.v1.NextChar/Generate", body)
    assert code == 200, reply
    with NextCharClient(server.address, timeout=60) as client:
        direct = client.generate("lstm", PROMPT, 60, temperature=0.9, seed=5)
    assert reply["text"] == direct.text
    assert reply["summary"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert reply["summary"]["seed"] == "5"  # proto3 JSON writes 64-bit integers as strings


def test_streams_as_a_json_array(curl: str, gateway: str, server) -> None:
    body = {"model": {"name": "gru"}, "prompt": PROMPT, "max_new_chars": 80, "temperature": 0}  # greedy
    code, messages = _curl(curl, f"{gateway}/nextchar.v1.NextChar/GenerateStream", body)
    assert code == 200 and isinstance(messages, list), messages
    with NextCharClient(server.address, timeout=60) as client:
        direct = client.generate("gru", PROMPT, 80, temperature=0.0)
    assert "".join(m.get("text", "") for m in messages) == direct.text
    assert messages[-1]["summary"]["usage"]["generated_chars"] == 80


def test_a_bad_field_is_http_400_naming_it(curl: str, gateway: str) -> None:
    url = f"{gateway}/nextchar.v1.NextChar/Generate"
    code, reply = _curl(curl, url, {"model": {"name": "lstm"}, "prompt": PROMPT, "max_new_chars": 0})
    assert code == 400, reply
    assert reply["message"].startswith("max_new_chars: must be in [1, "), reply
    (details,) = reply["details"]
    assert details["field_violations"][0]["field"] == "max_new_chars", details
    # A value of the wrong type never reaches the server: the transcoder refuses it, naming the field.
    code, reply = _curl(curl, url, {"model": {"name": "lstm"}, "prompt": PROMPT, "max_new_chars": "many"})
    assert code == 400 and "max_new_chars" in reply, reply
    # An unknown field is dropped (the proto3 JSON mapping; Envoy has no switch to refuse it), so the
    # server's own check names the field that is then missing.
    code, reply = _curl(curl, url, {"model": {"name": "lstm"}, "prompt": PROMPT, "max_new_charz": 5})
    assert code == 400 and reply["message"].startswith("max_new_chars: must be in [1, "), reply
