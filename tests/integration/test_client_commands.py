"""Client edges: `nextchar generate|predict|score --model-file` on a bad file, a closed stdout pipe, and
leaving an async generation stream early."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from server_harness import ROOT, nextchar_cmd, run_cli, wait_until

from nextchar.client.client import AsyncNextCharClient

COMMANDS = {
    "generate": ("--prompt", "O say"),
    "predict": ("--context", "O say"),
    "score": ("--text", "O say"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["missing", "not_onnx"])
def test_a_bad_model_file_exits_2_with_one_line_naming_it(tmp_path: Path, command: str, kind: str) -> None:
    model_file = tmp_path / "model.onnx"
    if kind == "not_onnx":
        model_file.write_bytes(b"not an ONNX model\n" * 10)
    result = run_cli(command, "--model-file", str(model_file), *COMMANDS[command])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nextchar {command}: ")
    assert str(model_file) in lines[0]
    assert result.stdout == ""


def test_generate_into_a_closed_pipe_exits_quietly(model_repo: Path) -> None:
    """`nextchar generate ... | head -c1`: more text than a pipe holds, the reader gone after one byte."""
    model_file = str(model_repo / "gru" / "1" / "model.onnx")
    proc = subprocess.Popen(
        nextchar_cmd("generate", "--model-file", model_file, "--prompt", "O say", "--max-chars", "100000",
                     "--seed", "1", "--quiet"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141  # 128 + SIGPIPE, as a tool killed by the signal
    assert stderr == ""


def test_leaving_an_async_stream_early_stops_the_server(make_server) -> None:
    server = make_server(max_new_chars=100_000)
    runner = server.runner
    before = runner.cancelled_streams

    async def run() -> str:
        async with (AsyncNextCharClient(server.address, timeout=60) as ac,
                    ac.generate_stream("lstm", "O say", 100_000, seed=1) as stream):
            async for text in stream:
                return text
        return ""

    assert asyncio.run(run())
    wait_until(lambda: runner.cancelled_streams == before + 1, 10, "the server to stop generating")
