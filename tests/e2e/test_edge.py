"""A model file runs without Python: the same greedy text from onnxruntime, the offline client, Node, browser.

Node and the browser page need scripts/install_edge.sh (npm packages, Debian chromium); the session
fixtures run it, and skip only when node or chromium cannot be had on this machine.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from edge_harness import CLIENT_DIR, GENERATE_MJS, NODE_TIMEOUT_S, PageServer, open_page, run_node, serve_page

CELLS = ("lstm", "gru", "rnn")
VARIANTS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
PROMPT = "O say"
MAX_CHARS = 80


# ------------------------------------------------------------------------------------------------
# The four runners: the same greedy loop, four implementations.

@functools.cache
def _python_session(model_file: Path):  # one session per file, shared by the tests that read it
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    manifest = json.loads(meta["nextchar.manifest"])
    return session, manifest, json.loads(meta["nextchar.vocab"])


def _run_python(model_file: Path, tokens: list[int], state: dict | None) -> tuple[np.ndarray, dict]:
    """tokens: int64[T] from `state` (None: zeros) -> (logits float32[T, V], next state feeds)."""
    session, manifest, _ = _python_session(model_file)
    arch, io = manifest["architecture"], manifest["io"]
    names = [n for n in ("h0", "c0") if io.get(n)]
    if state is None:
        shape = (arch["num_layers"], 1, arch["hidden_size"])
        state = {io[n]: np.zeros(shape, np.float32) for n in names}
    outputs = [io["logits"]] + [io[{"h0": "hn", "c0": "cn"}[n]] for n in names]
    logits, *new = session.run(outputs, {io["tokens"]: np.array([tokens], np.int64), **state})
    return logits[0], {io[n]: s for n, s in zip(names, new, strict=True)}


def greedy_python(model_file: Path, prompt: str, max_chars: int) -> str:
    """The reference: a direct onnxruntime loop, prompt in one run, then one run per char."""
    _, _, vocab = _python_session(model_file)
    index = {ch: i for i, ch in enumerate(vocab)}
    logits, state = _run_python(model_file, [index[ch] for ch in prompt], None)
    out: list[str] = []
    while True:
        token = int(np.argmax(logits[-1]))
        out.append(vocab[token])
        if len(out) == max_chars:
            return "".join(out)
        logits, state = _run_python(model_file, [token], state)


def greedy_offline(model_file: Path, prompt: str, max_chars: int) -> str:
    """client/offline.py's Python API: the server's own engine and generation code, in-process."""
    from nextchar.client.offline import OfflineModel

    return OfflineModel.from_file(model_file).generate(prompt, max_chars, temperature=0.0).text


def greedy_offline_cli(model_file: Path, prompt: str, max_chars: int) -> str:
    """`nextchar generate --model-file` (client/offline.py behind the CLI), in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "nextchar.client.cli", "generate", "--model-file", str(model_file),
         "--prompt", prompt, "--max-chars", str(max_chars), "--temperature", "0", "--quiet"],
        capture_output=True, encoding="utf-8", timeout=NODE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert done.returncode == 0, f"nextchar generate --model-file failed ({done.returncode}): {done.stderr}"
    assert done.stdout.endswith("\n")
    return done.stdout[:-1]  # the command ends its output with one newline of its own


def greedy_node(node: str, model_file: Path, prompt: str, max_chars: int) -> str:
    done = subprocess.run(
        [node, str(GENERATE_MJS), "--model", str(model_file), "--prompt", prompt,
         "--max-chars", str(max_chars), "--temperature", "0", "--json"],
        capture_output=True, encoding="utf-8", timeout=NODE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
    )
    assert done.returncode == 0, f"generate.mjs failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)["text"]


def greedy_browser(chromium: str, server: PageServer, model_path: str, prompt: str, max_chars: int,
                   profile: Path) -> str:
    """Open client/web in headless chromium with auto=1 (temperature 0) and return the page's text."""
    query = {"model": f"/models/{model_path}", "prompt": prompt, "max": max_chars, "temperature": 0,
             "auto": 1}
    return open_page(chromium, server, "/web/index.html", query, profile)["text"]


def first_difference(a: str, b: str) -> int | None:
    """Index of the first differing character, or None when a == b."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


# ------------------------------------------------------------------------------------------------
# Tests

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cell", CELLS)
def test_same_greedy_text_everywhere(
    cell: str, variant: str, model_repo: Path, node: str, chromium: str, page_server: PageServer,
    tmp_path: Path,
) -> None:
    model_file = model_repo / cell / "1" / VARIANTS[variant]
    expected = greedy_python(model_file, PROMPT, MAX_CHARS)
    assert len(expected) == MAX_CHARS

    assert greedy_offline(model_file, PROMPT, MAX_CHARS) == expected
    assert greedy_node(node, model_file, PROMPT, MAX_CHARS) == expected
    page = greedy_browser(chromium, page_server, f"{cell}/1/{VARIANTS[variant]}", PROMPT, MAX_CHARS, tmp_path)
    assert page == expected


@pytest.mark.parametrize("cell", CELLS)
def test_int8_against_fp32_is_reported(cell: str, model_repo: Path, capsys: pytest.CaptureFixture) -> None:
    """int8 need not match fp32; how far it does is printed (and recorded in the manifest at export)."""
    version = model_repo / cell / "1"
    fp32 = greedy_python(version / VARIANTS["fp32"], PROMPT, MAX_CHARS)
    int8 = greedy_python(version / VARIANTS["int8"], PROMPT, MAX_CHARS)
    manifest = json.loads((version / "manifest.json").read_text())
    agreement = manifest["int8"]["argmax_agreement"]
    assert 0.0 <= agreement <= 1.0
    diverges = first_difference(fp32, int8)
    with capsys.disabled():
        print(f"\n[edge] {cell} int8 vs fp32: teacher-forced argmax agreement {agreement:.4f} (manifest); "
              f"greedy {MAX_CHARS} chars from {PROMPT!r}: "
              + ("identical" if diverges is None else f"first divergence at char {diverges}")
              + f"\n  fp32: {fp32!r}\n  int8: {int8!r}")


def test_characters_are_code_points_not_utf16_units(
    export_tiny, node: str, chromium: str, tmp_path: Path,
) -> None:
    """Astral characters (two UTF-16 units) in the vocab and the prompt: the same text everywhere."""
    vocab = ("\n", " ", "a", "b", "c", "é", "😀", "𝄞", "’")
    # Untrained, so mostly one repeated char; this seed's text mixes 😀 and spaces.
    version = export_tiny(cell="gru", vocab=vocab, hidden_size=16, seed=2)
    prompt = "a😀b𝄞é"
    expected = greedy_python(version / "model.onnx", prompt, 40)
    assert {"😀", "𝄞"} & set(expected), f"pick a seed whose text has astral chars: {expected!r}"
    assert greedy_offline_cli(version / "model.onnx", prompt, 40) == expected
    assert greedy_node(node, version / "model.onnx", prompt, 40) == expected
    models_dir = version.parent.parent
    with serve_page(models_dir) as server:
        rel = version.relative_to(models_dir).as_posix()
        assert greedy_browser(chromium, server, f"{rel}/model.onnx", prompt, 40, tmp_path) == expected


def test_node_rejects_bad_input_with_a_clear_error(node: str, model_repo: Path, tmp_path: Path) -> None:
    model = str(model_repo / "lstm" / "1" / "model.onnx")
    oov = run_node(node, "--model", model, "--prompt", "O say Ω")
    assert oov.returncode == 2
    assert "prompt: 1 character(s) not in the model's vocabulary: \"Ω\" at 6" in oov.stderr

    too_many = run_node(node, "--model", model, "--prompt", "O", "--max-chars", "0")
    assert too_many.returncode == 2
    assert "--max-chars must be an integer in [1, 100000]" in too_many.stderr

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x0bnot a protobuf")
    bad = run_node(node, "--model", str(not_onnx), "--prompt", "O")
    assert bad.returncode == 2
    assert "not an ONNX model" in bad.stderr

    import onnx

    plain = onnx.load(model)
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    done = run_node(node, "--model", str(foreign), "--prompt", "O")
    assert done.returncode == 2
    assert 'not a nextchar model: ONNX metadata has no "nextchar.manifest"' in done.stderr


def test_js_library_unit_tests(node: str) -> None:
    """client/js/test/*.test.mjs with node's own test runner: metadata reader, manifest checks, argmax."""
    done = subprocess.run(
        [node, "--test", str(CLIENT_DIR / "js" / "test")], capture_output=True, encoding="utf-8",
        timeout=NODE_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    assert passed is not None and int(passed.group(1)) > 0, done.stdout[-2000:]


def test_page_empty_temperature_is_the_default_not_greedy(
    model_repo: Path, chromium: str, page_server: PageServer, tmp_path: Path,
) -> None:
    """An empty temperature field means absent (1, the server's default), as does an empty top-p (1)."""
    from nextchar.client.offline import OfflineModel

    model = OfflineModel.from_file(model_repo / "lstm" / "1" / "model.onnx")
    want = model.generate(PROMPT, MAX_CHARS, seed=7).text  # temperature absent: 1
    assert want != greedy_python(model_repo / "lstm" / "1" / "model.onnx", PROMPT, MAX_CHARS)
    query = {"model": "/models/lstm/1/model.onnx", "prompt": PROMPT, "max": MAX_CHARS, "temperature": "",
             "top_p": "", "seed": 7, "auto": 1}
    page = open_page(chromium, page_server, "/web/index.html", query, tmp_path)
    assert (page["text"], page["seed"]) == (want, "7")


def test_page_loading_a_model_while_generating_keeps_generate_disabled(
    model_repo: Path, chromium: str, page_server: PageServer, tmp_path: Path,
) -> None:
    """A model loaded during a generation is for the next one: Generate stays disabled until the running
    generation ends (no two at once), and the running one goes on with its own model."""
    chars = 10_000  # still running when the second (tiny) model has loaded (~1,200 chars in, here)
    first = urlencode({"model": "/models/lstm/1/model.onnx", "prompt": PROMPT, "max": chars,
                       "temperature": 0})
    seen = open_page(chromium, page_server, "/tests/e2e/web/load_while_generating.html",
                     {"page": f"/web/index.html?{first}", "second": "/models/gru/1/model.onnx"}, tmp_path,
                     timeout=180)
    assert seen["afterLoad"]["stillRunning"], f"the generation ended before the load: raise chars ({seen})"
    assert seen["afterLoad"]["generateDisabled"], "Generate was enabled while a generation was running"
    assert not seen["generateDisabledAtEnd"]
    assert seen["text"] == greedy_python(model_repo / "lstm" / "1" / "model.onnx", PROMPT, chars)


def test_js_limits_are_the_servers() -> None:
    """lib/nextchar.mjs refuses what the server refuses, and reads a prompt in the server's chunks
    (no node needed: the constants are read from the source)."""
    from nextchar.server.core.limits import MAX_NEW_CHARS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES
    from nextchar.server.core.prefill import PREFILL_CHUNK

    source = (CLIENT_DIR / "js" / "lib" / "nextchar.mjs").read_text()
    found = {m[1]: int(m[2].replace("_", ""))
             for m in re.finditer(r"^export const (\w+) = ([\d_]+);", source, re.MULTILINE)}
    assert found == {"MAX_NEW_CHARS": MAX_NEW_CHARS, "MAX_STOP_SEQUENCES": MAX_STOP_SEQUENCES,
                     "MAX_STOP_CHARS": MAX_STOP_CHARS, "PREFILL_CHUNK": PREFILL_CHUNK}
