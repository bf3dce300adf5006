"""The `nextchar` client commands as subprocesses against a real server (and offline, --model-file)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from server_harness import ROOT, free_port, nextchar_cmd, run_cli

from nextchar.client.client import AsyncNextCharClient, NextCharClient

PROMPT = "O say can you see"


def _char(line: str) -> str:
    """The character column of predict / score --per-char output: its repr, right-aligned in 6."""
    return line[:6].strip()


def test_generate_streams_greedy_text_to_stdout(server) -> None:
    with NextCharClient(server.address) as c:
        expected = c.generate("lstm", PROMPT, 80, temperature=0.0).text
    result = run_cli("generate", "--server", server.address, "--model", "lstm", "--prompt", PROMPT,
                     "--max-chars", "80", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"  # the newline ends the output; it is not generated text
    assert "[lstm v1] finish=length prompt=17 generated=80 seed=" in result.stderr
    exact = run_cli("generate", "--server", server.address, "--model", "lstm", "--prompt", PROMPT,
                    "--max-chars", "80", "--temperature", "0", "--no-newline", "--quiet")
    assert (exact.returncode, exact.stdout, exact.stderr) == (0, expected, "")


def test_generate_prints_while_the_server_is_still_generating(server) -> None:
    before = server.tracks[-1].id if server.tracks else 0
    proc = subprocess.Popen(
        nextchar_cmd("generate", "--server", server.address, "--model", "rnn", "--prompt", "O say",
                     "--max-chars", "5000", "--temperature", "1.0", "--seed", "1", "--quiet"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.read(1)
        track = server.tracks[-1]
        assert track.id > before and track.finished_at is None  # output arrived before generation ended
        rest = proc.stdout.read()  # not communicate(): it would skip what the text wrapper buffered
        err = proc.stderr.read()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert len(first + rest) == 5000 + 1  # the text and a final newline


def test_generate_with_sampling_options_and_server_from_env(server) -> None:
    with NextCharClient(server.address) as c:
        expected = c.generate("gru", "O say", 60, temperature=0.8, top_k=10, top_p=0.875, seed=42,
                              stop=["\n"], echo=True).text
    result = run_cli("generate", "--model", "gru", "--prompt", "O say", "--max-chars", "60",
                     "--temperature", "0.8", "--top-k", "10", "--top-p", "0.875", "--seed", "42",
                     "--stop", "\n", "--echo", "--quiet", env={"NEXTCHAR_SERVER": server.address})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n" and result.stderr == ""


def test_bad_input_exits_2_and_names_the_field(server) -> None:
    result = run_cli("generate", "--server", server.address, "--model", "lstm", "--prompt", "O say",
                     "--top-p", "1.5")
    assert result.returncode == 2
    assert "nextchar generate: INVALID_ARGUMENT: top_p: must be in (0, 1]" in result.stderr
    missing = run_cli("predict", "--server", server.address, "--model", "nope", "--context", "O say")
    assert missing.returncode == 1 and "NOT_FOUND: model.name: no model named 'nope'" in missing.stderr


def test_predict_and_score(server) -> None:
    result = run_cli("predict", "--server", server.address, "--model", "lstm",
                     "--context", "O say can you se", "-n", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and _char(lines[0]) == "'e'"
    scored = run_cli("score", "--server", server.address, "--model", "lstm", "--text", "O say", "--per-char")
    assert scored.returncode == 0, scored.stderr
    with NextCharClient(server.address) as c:
        s = c.score("lstm", "O say")
    head, *chars = scored.stdout.splitlines()
    assert head == (f"chars=4 total_logprob={s.total_logprob:.4f} nats_per_char={s.nats_per_char:.4f} "
                    f"bits_per_char={s.bits_per_char:.4f}")
    assert [_char(line) for line in chars] == ["' '", "'s'", "'a'", "'y'"]


def test_models_lists_and_shows_a_manifest(server, model_repo: Path) -> None:
    listed = run_cli("models", "--server", server.address)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        ("gru", "1", "gru", "2×48"), ("lstm", "1", "lstm", "2×48"), ("rnn", "1", "rnn", "2×48")]
    assert {r[-1] for r in rows} == {"-"}  # trained without a validation split: no loss, not "nan"
    shown = run_cli("models", "--server", server.address, "lstm")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == json.loads((model_repo / "lstm" / "1" / "manifest.json").read_text())


def test_health_exit_status(server) -> None:
    ok = run_cli("health", "--server", server.address)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    per_model = run_cli("health", "--server", server.address, "--service", "gru")
    assert (per_model.returncode, per_model.stdout.strip()) == (0, "SERVING")
    unknown = run_cli("health", "--server", server.address, "--service", "nope")
    assert (unknown.returncode, unknown.stdout.strip()) == (1, "SERVICE_UNKNOWN")

    async def unknown_async() -> str:
        async with AsyncNextCharClient(server.address, timeout=10) as c:
            return await c.health("nope")

    assert asyncio.run(unknown_async()) == "SERVICE_UNKNOWN"  # Check's NOT_FOUND, as the protocol names it
    down = run_cli("health", "--server", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert down.returncode == 1 and ("UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr)


def test_offline_model_file_matches_the_server(server, model_repo: Path) -> None:
    model_file = str(model_repo / "gru" / "1" / "model.onnx")
    with NextCharClient(server.address) as c:
        expected = c.generate("gru", PROMPT, 60, temperature=0.0).text
        best = c.predict_next("gru", PROMPT, 2)
    result = run_cli("generate", "--model-file", model_file, "--prompt", PROMPT, "--max-chars", "60",
                     "--temperature", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    predicted = run_cli("predict", "--model-file", model_file, "--context", PROMPT, "-n", "2")
    assert predicted.returncode == 0, predicted.stderr
    assert [_char(line) for line in predicted.stdout.splitlines()] == [repr(p.char) for p in best]
