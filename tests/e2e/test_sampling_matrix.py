"""One seeded sampler everywhere: the same text from the server (alone, among 63 batch mates), the offline
runner, Node and the browser page, for LSTM/GRU/RNN fp32; and the int8 guarantee (docs/sampling.md).

Equality is exact throughout: the sampler's every step is IEEE basic arithmetic (docs/sampling.md), and
the logits of one model file are bit-identical in onnxruntime (Python), onnxruntime-node and -web here.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_harness import browser_cases, node_cases, open_page, run_node

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # the server harness
from server_harness import ServerThread, server_config

from nextchar.client.client import AsyncNextCharClient, NextCharClient
from nextchar.client.offline import OfflineModel
from nextchar.server.core.prefill import PREFILL_CHUNK, prefill
from nextchar.server.core.sampling import (
    SamplingParams,
    philox_uniform,
    portable_exp,
    sample,
)

CELLS = ("lstm", "gru", "rnn")
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
# Seeded sampling with every knob; the stop sequences end some of them early (checked below).
CASES = (
    {"prompt": "O say", "maxChars": 200, "temperature": 0.8, "topK": 10, "topP": 0.9, "seed": 42,
     "stop": ["\n"]},
    {"prompt": "O say can you see", "maxChars": 150, "temperature": 1.0, "topK": 0, "topP": 1.0,
     "seed": 2**64 - 1, "stop": []},
    {"prompt": "And the", "maxChars": 200, "temperature": 1.3, "topK": 5, "topP": 0.95, "seed": 7,
     "stop": ["the ", "ee"]},
    {"prompt": "What so", "maxChars": 120, "temperature": 0.5, "topK": 0, "topP": 0.5,
     "seed": 123456789012345, "stop": [" bra"]},
)
BATCH = 64  # each case's stream shares the engine with 63 others
MATES_PROMPTS = ("O", "O say", "Oh", "What so proudly", "And the rocket", "s red glare")


def _kwargs(case: dict) -> dict:
    return {"temperature": case["temperature"], "top_k": case["topK"], "top_p": case["topP"],
            "seed": case["seed"], "stop": case["stop"]}


def _js_case(case: dict, model: str) -> dict:
    return {**case, "model": model, "seed": str(case["seed"])}


def _mates(n: int, rng: random.Random) -> list[tuple[str, int, dict]]:
    """Other streams: greedy and sampled, other prompts (so other prefill groups), no stop sequence and
    far longer than the cases, which start once every mate is decoding: every one of their decode
    steps then shares the engine with all the mates."""
    return [(rng.choice(MATES_PROMPTS), rng.randrange(700, 1000),  # the servers here allow 1000
             {"temperature": rng.choice([0.0, 0.3, 1.0, 2.0]), "top_k": rng.choice([0, 3, 20]),
              "top_p": rng.choice([1.0, 0.8]), "seed": rng.randrange(2**64)})
            for _ in range(n)]


async def _among_mates(server: ServerThread, name: str, mates: list[tuple[str, int, dict]],
                       cases: list[tuple[str, int, dict]]) -> list:
    """Start the mates, wait (server-side, bounded) until all of them decode, then run the cases."""
    async with AsyncNextCharClient(server.address, timeout=120) as c:
        running = [asyncio.ensure_future(c.generate(name, p, n, **kw)) for p, n, kw in mates]
        for _ in range(3000):
            cores = [b.core for b in server.runner.batchers if b.core.engine.artifact.name == name]
            if cores and len(cores[0].active) >= len(mates):
                break
            if server.config.variant == "int8" and server.runner.in_flight >= len(mates):
                break  # int8 runs unbatched (--batching auto): each mate on its own worker
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the {len(mates)} mates never all decoded at once")
        together = await asyncio.gather(*(c.generate(name, p, n, **kw) for p, n, kw in cases))
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return list(together)


def _server_texts(server: ServerThread, name: str, cases: tuple[dict, ...], mates: int,
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(alone, among `mates` others) -> [(text, finish reason)] per case."""
    with NextCharClient(server.address, timeout=120) as c:
        alone = [c.generate(name, case["prompt"], case["maxChars"], **_kwargs(case)) for case in cases]
    others = _mates(mates + 1 - len(cases), random.Random(name))
    requests = [(case["prompt"], case["maxChars"], _kwargs(case)) for case in cases]
    together = asyncio.run(_among_mates(server, name, others, requests))
    return ([(g.text, g.summary.finish_reason) for g in alone],
            [(g.text, g.summary.finish_reason) for g in together])


def _offline_texts(model_file: Path, cases: tuple[dict, ...]) -> list[tuple[str, str]]:
    model = OfflineModel.from_file(model_file)
    out = []
    for case in cases:
        r = model.generate(case["prompt"], case["maxChars"], **_kwargs(case))
        out.append((r.text, r.finished.reason.value))
    return out


def _js_texts(result: dict) -> list[tuple[str, str]]:
    return [(g["text"], g["finish_reason"]) for g in result["generations"]]


@pytest.fixture(scope="module")
def batched_server(model_repo: Path):
    # One batcher per model, so the 64 streams share one decode batch (with the default, one batcher
    # per core, they would split across batchers of 32).
    s = ServerThread(server_config(model_repo, batching="auto", max_batch_size=BATCH, max_new_chars=1000,
                                   model_instances=1))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def int8_server(model_repo: Path):
    s = ServerThread(server_config(model_repo, batching="auto", variant="int8", max_new_chars=1000))
    yield s
    s.stop()


def test_fp32_same_text_alone_batched_offline_node_and_browser(
    batched_server: ServerThread, model_repo: Path, node: str, chromium: str, page_server, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    expected: dict[str, list[tuple[str, str]]] = {}
    for cell in CELLS:
        alone, together = _server_texts(batched_server, cell, CASES, BATCH - 1)
        assert together == alone, f"{cell}: a batch mate changed a seeded text"
        assert _offline_texts(model_repo / cell / "1" / FILES["fp32"], CASES) == alone, cell
        expected[cell] = alone
    sizes = {b.core.engine.artifact.name: max(b.core.stats.batch_sizes)
             for b in batched_server.runner.batchers}
    assert sizes == {cell: BATCH for cell in CELLS}, f"largest decode batches {sizes}"
    reasons = {r for texts in expected.values() for _, r in texts}
    assert reasons == {"length", "stop_sequence"}, "the cases should end both ways"

    want = [t for cell in CELLS for t in expected[cell]]
    node_out = node_cases(node, {"generations": [
        _js_case(case, str(model_repo / cell / "1" / FILES["fp32"])) for cell in CELLS for case in CASES]})
    assert _js_texts(node_out) == want
    page_out = browser_cases(chromium, page_server, {"generations": [
        _js_case(case, f"/models/{cell}/1/{FILES['fp32']}") for cell in CELLS for case in CASES]},
        tmp_path, timeout=180)
    assert _js_texts(page_out) == want
    with capsys.disabled():
        print(f"\n[sampler] fp32 {len(want)} seeded texts ({sum(len(t) for t, _ in want)} chars) identical: "
              f"server alone, among {BATCH - 1} batch mates, offline, Node, browser")


def test_node_cli_and_page_controls_give_the_servers_seeded_text(
    batched_server: ServerThread, model_repo: Path, node: str, chromium: str, page_server, tmp_path: Path,
) -> None:
    """The user-facing knobs (generate.mjs flags, the page's query parameters) reach the same sampler."""
    case = CASES[0]
    with NextCharClient(batched_server.address, timeout=60) as c:
        want = c.generate("gru", case["prompt"], case["maxChars"], **_kwargs(case))
    flags = ["--model", str(model_repo / "gru" / "1" / FILES["fp32"]), "--prompt", case["prompt"],
             "--max-chars", str(case["maxChars"]), "--temperature", str(case["temperature"]),
             "--top-k", str(case["topK"]), "--top-p", str(case["topP"]), "--seed", str(case["seed"]),
             "--json"]
    for stop in case["stop"]:
        flags += ["--stop", stop]
    done = run_node(node, *flags)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["text"], got["finish_reason"], got["seed"]) == (want.text, want.summary.finish_reason,
                                                                str(case["seed"]))
    query = {"model": f"/models/gru/1/{FILES['fp32']}", "prompt": case["prompt"], "max": case["maxChars"],
             "temperature": case["temperature"], "top_k": case["topK"], "top_p": case["topP"],
             "seed": case["seed"], "stop": case["stop"], "auto": 1}
    page = open_page(chromium, page_server, "/web/index.html", query, tmp_path)
    assert (page["text"], page["finish_reason"], page["seed"]) == (want.text, want.summary.finish_reason,
                                                                   str(case["seed"]))


def test_int8_unbatched_server_equals_offline_node_and_browser(
    int8_server: ServerThread, model_repo: Path, node: str, chromium: str, page_server, tmp_path: Path,
) -> None:
    """The int8 guarantee: --batching auto never batches int8 (its kernels quantize per batch), so its
    seeded text does not depend on other requests and equals the offline runner's, Node's and the page's."""
    cases = CASES[:2]
    want = []
    for cell in CELLS:
        alone, together = _server_texts(int8_server, cell, cases, 15)
        assert together == alone, f"{cell} int8: another request changed a seeded text"
        assert _offline_texts(model_repo / cell / "1" / FILES["int8"], cases) == alone, cell
        want += alone
    assert not int8_server.runner.batchers  # unbatched: nothing else shares its engine calls
    node_out = node_cases(node, {"generations": [
        _js_case(case, str(model_repo / cell / "1" / FILES["int8"])) for cell in CELLS for case in cases]})
    assert _js_texts(node_out) == want
    page_out = browser_cases(chromium, page_server, {"generations": [
        _js_case(case, f"/models/{cell}/1/{FILES['int8']}") for cell in CELLS for case in cases]},
        tmp_path, timeout=180)
    assert _js_texts(page_out) == want


LOGITS_ATOL = 1e-5  # a few float32 ulps of these logits (|x| < 20); chunking changes them ~1e-2


def _long_prompt(chars: int) -> str:
    """The anthem (the test models' corpus), repeated as needed: every character is in their vocabularies."""
    from nextchar.training.corpora import load_corpus

    text = load_corpus("anthem").text
    return (text * (chars // len(text) + 1))[:chars]


def test_int8_long_prompt_in_the_servers_chunks_everywhere(
    int8_server: ServerThread, model_repo: Path, node: str, chromium: str, page_server, tmp_path: Path,
) -> None:
    """A prompt longer than PREFILL_CHUNK goes through the model in the server's calls of at most
    PREFILL_CHUNK positions (server/core/prefill.py) in Node and the page too. int8 quantizes each call
    over all of its positions, so one call over the whole prompt gives other logits (~1e-2 here, checked),
    and so, for some seeds, other text. The logits after the prompt are compared up to LOGITS_ATOL (the
    runtimes differ by a few ulps on long calls: onnxruntime-web's wasm kernels), then seeded texts."""
    lengths = (PREFILL_CHUNK, PREFILL_CHUNK + 1, 300, 2 * PREFILL_CHUNK + 88)  # 1, 2, 2 and 3 calls
    files = {cell: model_repo / cell / "1" / FILES["int8"] for cell in CELLS}
    want_logits, one_call = [], []
    for cell in CELLS:
        engine = OfflineModel.from_file(files[cell]).engine
        index = {ch: i for i, ch in enumerate(engine.vocab)}
        for n in lengths:
            tokens = np.array([[index[ch] for ch in _long_prompt(n)]], np.int64)
            want_logits.append(prefill(engine, tokens, engine.initial_state(1))[0][0].tolist())
            one_call.append(prefill(engine, tokens, engine.initial_state(1), chunk=n)[0][0].tolist())
    chunking = float(np.abs(np.array(want_logits) - np.array(one_call)).max())
    assert chunking > 100 * LOGITS_ATOL, f"int8 logits should depend on the chunks (differ by {chunking})"
    prefills = [{"model": str(files[cell]), "prompt": _long_prompt(n)} for cell in CELLS for n in lengths]
    node_out = node_cases(node, {"prefills": prefills})
    np.testing.assert_allclose(node_out["prefills"], want_logits, rtol=0, atol=LOGITS_ATOL)

    # With the prompt in one call, the LSTM's text for seeds 7, 20 (300 chars) and 15 (600) differs.
    cases = tuple({"prompt": _long_prompt(n), "maxChars": 80, "temperature": t, "topK": k, "topP": 1.0,
                   "seed": seed, "stop": []}
                  for n, t, k, seed in ((300, 1.0, 0, 7), (300, 1.0, 0, 20), (300, 0.8, 10, 2),
                                        (300, 0.0, 0, 0), (600, 1.0, 0, 15)))
    want = []
    for cell in CELLS:
        with NextCharClient(int8_server.address, timeout=120) as c:
            alone = [(g.text, g.summary.finish_reason) for g in
                     (c.generate(cell, case["prompt"], case["maxChars"], **_kwargs(case)) for case in cases)]
        assert _offline_texts(files[cell], cases) == alone, cell
        want += alone
    node_out = node_cases(node, {"generations": [_js_case(case, str(files[cell])) for cell in CELLS
                                                 for case in cases]})
    assert _js_texts(node_out) == want
    url = {cell: f"/models/{cell}/1/{FILES['int8']}" for cell in CELLS}
    page_out = browser_cases(chromium, page_server, {
        "generations": [_js_case(case, url[cell]) for cell in CELLS for case in cases],
        "prefills": [{"model": url[cell], "prompt": _long_prompt(n)} for cell in CELLS for n in lengths],
    }, tmp_path, timeout=180)
    np.testing.assert_allclose(page_out["prefills"], want_logits, rtol=0, atol=LOGITS_ATOL)
    assert _js_texts(page_out) == want


# ------------------------------------------------------------------------------------------------
# The sampler alone: Python and JavaScript on the same random inputs, bit for bit.

def _random_rows(rng: np.random.Generator, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        vocab = int(rng.choice([2, 3, 7, 31, 97]))
        logits = (rng.normal(0, 1, vocab) * rng.choice([0.01, 1.0, 5.0, 30.0, 1e4])).astype(np.float32)
        if i % 5 == 0:
            logits[:3] = logits[0]  # ties, at the top
        if i % 7 == 0:
            logits = np.round(logits)
        if i % 11 == 0 and vocab > 3:
            logits[-2:] = -np.inf
        if i % 101 == 0:
            logits[vocab // 2] = np.inf
        if i % 103 == 0:
            logits[:] = -np.inf
        u = float(rng.random()) if i % 13 else float(rng.choice([0.0, 1 - 2**-53]))
        rows.append({"logits": logits.tolist(), "u": u,
                     "temperature": float(rng.choice([0.0, 1e-30, 1e-6, 0.01, 0.7, 1.0, 3.0, 100.0])),
                     "topK": int(rng.choice([0, 1, 2, 5, vocab, vocab + 7])),
                     "topP": float(rng.choice([1.0, 0.999, 0.9, 0.5, 1e-6]))})
    return rows


def test_javascript_sampler_equals_python_bit_for_bit(node: str, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(2026)
    rows = _random_rows(rng, 5000)
    seeds = [int(s) for s in rng.integers(0, 2**64 - 1, 2000, dtype=np.uint64, endpoint=True)]
    draws = [int(i) for i in rng.integers(0, 2**40, 2000)]
    z = np.concatenate([-rng.exponential(3.0, 10_000), -rng.uniform(0, 708, 10_000)])
    cases = {"uniforms": [[str(s), i] for s, i in zip(seeds, draws, strict=True)], "exp": z.tolist(),
             "rows": rows}
    out = node_cases(node, json.dumps(cases).replace("Infinity", "1e999"))  # JSON has no infinities
    assert out["uniforms"] == [philox_uniform(s, i) for s, i in zip(seeds, draws, strict=True)]
    assert out["exp"] == portable_exp(z).tolist()
    want = [sample(np.array(r["logits"], np.float32), SamplingParams(r["temperature"], r["topK"], r["topP"]),
                   r["u"]) for r in rows]
    assert out["tokens"] == want
    with capsys.disabled():
        print(f"\n[sampler] Python == Node: {len(rows)} rows, {len(seeds)} uniforms, {z.size} exps")
