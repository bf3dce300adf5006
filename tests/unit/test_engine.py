"""The onnxruntime engine on real exported models: graph checks, state handling, batching helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from philox_ref import sample, uniforms

from nextchar.server.core import artifact as artifact_module
from nextchar.server.core.artifact import ArtifactError, load_artifact
from nextchar.server.core.contract import concat_states, take
from nextchar.server.core.engine import Engine, available_cores
from nextchar.v1 import manifest_pb2

CELLS = ("lstm", "gru", "rnn")


@pytest.fixture(scope="module")
def engines(model_repo) -> dict[str, Engine]:
    out = {}
    for name in CELLS:
        engine = Engine.load(load_artifact(model_repo / name / "1"))
        engine.warmup()
        out[name] = engine
    return out


def ids(engine: Engine, text: str) -> np.ndarray:
    return np.array([[engine.vocab_index[c] for c in text]], dtype=np.int64)


@pytest.mark.parametrize("cell", CELLS)
def test_attributes_follow_the_manifest(engines, cell):
    e = engines[cell]
    a = e.artifact.manifest.architecture
    assert e.vocab == tuple(e.artifact.manifest.vocab) and e.vocab_size == len(e.vocab) == a.vocab_size
    assert (e.num_layers, e.hidden_size) == (a.num_layers, a.hidden_size)
    assert e.has_cell_state == (cell == "lstm")
    state = e.initial_state(3)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (a.num_layers, 3, a.hidden_size) and s.dtype == np.float32 and not s.any()
               for s in state)


@pytest.mark.parametrize("cell", CELLS)
def test_prefill_once_equals_char_by_char(engines, cell):
    e = engines[cell]
    tokens = ids(e, "O say can you see, by the dawn’s early light")
    logits, state = e.step(tokens, e.initial_state(1))
    assert logits.shape == (1, tokens.shape[1], e.vocab_size) and logits.dtype == np.float32
    s = e.initial_state(1)
    rows = []
    for t in range(tokens.shape[1]):
        out, s = e.step(tokens[:, t:t + 1], s)
        rows.append(out[0, 0])
    np.testing.assert_allclose(logits[0], np.stack(rows), atol=1e-4, rtol=1e-4)
    for a, b in zip(state, s, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_context(engines, cell):
    e = engines[cell]
    _, state = e.step(ids(e, "O say can you"), e.initial_state(1))
    with_context, _ = e.step(ids(e, " "), state)
    without, _ = e.step(ids(e, " "), e.initial_state(1))
    assert not np.allclose(with_context, without, atol=1e-3)


@pytest.mark.parametrize("cell", CELLS)
def test_a_batched_step_equals_the_rows_stepped_alone(engines, cell):
    e = engines[cell]
    prompts = ["O say", "What so", "Gave p"]
    states = [e.step(ids(e, p), e.initial_state(1))[1] for p in prompts]
    nxt = np.array([[e.vocab_index[c]] for c in "ear"], dtype=np.int64)
    batch_logits, batch_state = e.step(nxt, concat_states(states))
    for i, s in enumerate(states):
        alone, alone_state = e.step(nxt[i:i + 1], s)
        np.testing.assert_allclose(batch_logits[i:i + 1], alone, atol=1e-5)
        for a, b in zip(take(batch_state, [i]), alone_state, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_take_concat_round_trip(engines):
    e = engines["lstm"]
    _, state = e.step(np.zeros((4, 3), np.int64), e.initial_state(4))
    picked = take(state, [2, 0])
    assert all(p.shape == (e.num_layers, 2, e.hidden_size) for p in picked)
    np.testing.assert_array_equal(picked[1][:, 0], state[1][:, 2])
    rows = [take(state, [i]) for i in range(4)]
    assert len(rows) == 4 and all(r[0].shape[1] == 1 for r in rows)
    for a, b in zip(concat_states(rows), state, strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_rejects_bad_inputs(engines):
    e = engines["gru"]
    with pytest.raises(ValueError, match="int64"):
        e.step(np.zeros((1, 2), np.int32), e.initial_state(1))
    with pytest.raises(ValueError, match="token ids"):
        e.step(np.array([[e.vocab_size]]), e.initial_state(1))
    with pytest.raises(ValueError, match="state"):
        e.step(np.zeros((2, 1), np.int64), e.initial_state(1))


def test_int8_variant_loads_and_mostly_agrees(model_repo, engines):
    e8 = Engine.load(load_artifact(model_repo / "lstm" / "1", variant="int8"))
    e8.warmup()
    e = engines["lstm"]
    tokens = ids(e, "O say can you see")
    a, _ = e.step(tokens, e.initial_state(1))
    b, _ = e8.step(tokens, e8.initial_state(1))
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.5


def test_embedding_model(export_tiny):
    e = Engine.load(load_artifact(export_tiny(cell="gru", embedding_dim=8)))
    e.warmup()
    logits, _ = e.step(np.array([[1, 2, 3]]), e.initial_state(1))
    assert logits.shape == (1, 3, e.vocab_size)


def _with_manifest(artifact, edit):
    m = manifest_pb2.ModelManifest()
    m.CopyFrom(artifact.manifest)
    edit(m)
    vocab = tuple(m.vocab)
    return dataclasses.replace(artifact, manifest=m, vocab=vocab)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: setattr(m.architecture, "hidden_size", 7), "state"),
    (lambda m: setattr(m.architecture, "num_layers", 3), "state"),
    (lambda m: setattr(m.io, "tokens", "ids"), "inputs"),
    (lambda m: setattr(m.io, "hn", "h_out"), "outputs"),
    (lambda m: m.vocab.append("\t"), "vocab size"),
    (lambda m: setattr(m.architecture, "cell", manifest_pb2.CELL_TYPE_GRU), "inputs"),
])
def test_graph_is_checked_against_the_manifest(model_repo, edit, message):
    artifact = _with_manifest(load_artifact(model_repo / "lstm" / "1"), edit)
    with pytest.raises(ArtifactError, match=message):
        Engine.load(artifact)


def test_unloadable_file_is_an_artifact_error(model_repo, tmp_path):
    artifact = load_artifact(model_repo / "rnn" / "1")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(bad))}: onnxruntime cannot load"):
        Engine.load(dataclasses.replace(artifact, model_path=bad, model_bytes=bad.read_bytes()))
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(bad))}: onnxruntime cannot load"):
        Engine.from_file(bad)


def _negated_weights(model: bytes) -> bytes:
    """The same graph (same inputs, outputs and size class) with every float weight negated."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = onnx.load_model_from_string(model)
    for init in graph.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.size > 1:
            init.CopyFrom(numpy_helper.from_array(-weights, init.name))
    return graph.SerializeToString()


def test_a_model_file_replaced_after_its_check_is_never_served(model_repo_copy, engines, monkeypatch):
    """The file is swapped (a rename over it) right after its sha256 is taken: the engine must serve the
    checked bytes, in its one-step session and in the generation graph, not reopen the path."""
    d = model_repo_copy / "lstm" / "1"
    path = d / "model.onnx"
    checked = path.read_bytes()
    swapped = _negated_weights(checked)
    real_sha256, replaced = hashlib.sha256, []

    class Sha256:  # hashes as hashlib does; swaps the file once the digest is taken
        def __init__(self, data: bytes = b"") -> None:
            self._h = real_sha256(data)

        def update(self, data: bytes) -> None:
            self._h.update(data)

        def hexdigest(self) -> str:
            digest = self._h.hexdigest()
            if not replaced:
                (d / ".incoming").write_bytes(swapped)
                os.replace(d / ".incoming", path)
                replaced.append(path)
            return digest

    monkeypatch.setattr(artifact_module, "hashlib", SimpleNamespace(sha256=Sha256))
    artifact = load_artifact(d)
    monkeypatch.undo()
    assert replaced and path.read_bytes() == swapped != checked

    ref = engines["lstm"]  # loaded from the untouched repository
    tokens = ids(ref, "O say can you see")

    def logits(e: Engine) -> np.ndarray:
        return e.step(tokens, e.initial_state(1))[0]

    def greedy(e: Engine) -> np.ndarray:
        return e.generate(tokens, e.initial_state(1), np.full((1, 24), 0.5), np.ones(1),
                          np.ones(1, np.int64), np.ones(1))[0]

    served = Engine.load(artifact)
    served.warmup()
    np.testing.assert_allclose(logits(served), logits(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(greedy(served), greedy(ref))
    # The swap is one that would show: the replaced file serves other logits and other text.
    impostor = Engine.load(dataclasses.replace(artifact, model_bytes=swapped))
    assert not np.allclose(logits(impostor), logits(ref), atol=1e-2)
    assert not np.array_equal(greedy(impostor), greedy(ref))


def test_from_file_reads_manifest_and_vocab_from_metadata(model_repo, engines, tmp_path):
    lone = tmp_path / "anywhere.onnx"
    shutil.copy(model_repo / "gru" / "1" / "model.onnx", lone)  # no manifest.json beside it
    e = Engine.from_file(lone)
    ref = engines["gru"]
    assert e.vocab == ref.vocab and e.artifact.name == "gru" and e.artifact.version == 1
    tokens = ids(ref, "O say")
    mine, theirs = e.step(tokens, e.initial_state(1))[0], ref.step(tokens, ref.initial_state(1))[0]
    np.testing.assert_array_equal(mine, theirs)


def test_from_file_without_metadata(model_repo, tmp_path):
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(model_repo / "rnn" / "1" / "model.onnx"))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match=r"nextchar\.manifest"):
        Engine.from_file(tmp_path / "bare.onnx")
    with pytest.raises(ArtifactError, match="no such"):
        Engine.from_file(tmp_path / "missing.onnx")


@pytest.mark.parametrize("cell", CELLS)
def test_fp32_rows_are_bit_identical_alone_and_in_any_batch(engines, cell):
    # The guarantee the batcher relies on: measured by warmup's probe, checked here on other data.
    e = engines[cell]
    assert e.batch_invariant is True
    rng = np.random.default_rng(5)
    _, state = e.step(rng.integers(0, e.vocab_size, (16, 9)), e.initial_state(16))
    tokens = rng.integers(0, e.vocab_size, (16, 1))
    full, full_state = e.step(tokens, state)
    for rows in ([3], [3, 0], list(range(3, 12))):
        logits, new = e.step(tokens[rows], take(state, rows))
        np.testing.assert_array_equal(logits[0], full[3])
        for a, b in zip(new, full_state, strict=True):
            np.testing.assert_array_equal(a[:, 0], b[:, 3])


def test_int8_is_reported_batch_dependent(model_repo):
    # Dynamic quantization scales each tensor by its own range, so batch mates change a row's logits.
    e8 = Engine.load(load_artifact(model_repo / "gru" / "1", variant="int8"))
    assert e8.batch_invariant is None
    e8.warmup()
    assert e8.batch_invariant is False and e8.pad_single_rows is False


def test_thread_count_does_not_change_the_numbers(model_repo, engines):
    # onnxruntime splits work across threads without splitting sums, so results are bit-identical.
    e2 = Engine.load(load_artifact(model_repo / "lstm" / "1"), intra_op_threads=2)
    e2.warmup()
    e1 = engines["lstm"]
    tokens = np.random.default_rng(9).integers(0, e1.vocab_size, (8, 12))
    a, sa = e1.step(tokens, e1.initial_state(8))
    b, sb = e2.step(tokens, e2.initial_state(8))
    np.testing.assert_array_equal(a, b)
    for x, y in zip(sa, sb, strict=True):
        np.testing.assert_array_equal(x, y)


# The generation graph (K chars per Run) against the per-step loop with the spec's rule.

ROWS = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 5, 1.0), (0.5, 0, 0.9), (2.0, 3, 0.5), (0.0, 2, 0.3)]


def per_step(e: Engine, tokens: np.ndarray, state, u: np.ndarray):
    out = np.zeros(u.shape, np.int64)
    for i in range(u.shape[1]):
        logits, state = e.step(tokens, state)
        out[:, i] = [sample(row, *ROWS[b], u[b, i]) for b, row in enumerate(logits[:, -1])]
        if i < u.shape[1] - 1:
            tokens = out[:, i:i + 1]
    return out, state


@pytest.mark.parametrize("cell", CELLS)
def test_the_generation_graph_equals_the_per_step_loop_bit_for_bit(engines, cell):
    e = engines[cell]
    b, k = len(ROWS), 24
    tokens = np.stack([ids(e, p)[0, :4] for p in ["O say", "What so", "Gave p", "And th", "Whose", "O’er "]])
    state = e.initial_state(b)
    u = uniforms([1, 2, 3, 4, 2**63 + 5, 6], [0] * b, k)
    t, kk, p = (np.array(c) for c in zip(*ROWS, strict=True))
    got, got_state = e.generate(tokens, state, u, t, kk, p)
    want, want_state = per_step(e, tokens, state, u)
    assert np.array_equal(got, want)  # greedy rows (argmax) and sampled rows alike
    assert all(np.array_equal(a, w) for a, w in zip(got_state, want_state, strict=True))
    # Four calls of K=6 (each from the last char of the one before) are one call of K=24.
    parts, s, x = [], state, tokens
    for j in range(0, k, 6):
        out, s = e.generate(x, s, u[:, j:j + 6], t, kk, p)
        parts.append(out)
        x = out[:, -1:]
    assert np.array_equal(np.concatenate(parts, axis=1), got)
    assert all(np.array_equal(a, w) for a, w in zip(s, got_state, strict=True))
    # A lone row gives what it gives among the others (RNN runs it as a pair: pad_single_rows).
    alone, _ = e.generate(tokens[2:3], take(state, [2]), u[2:3], t[2:3], kk[2:3], p[2:3])
    assert np.array_equal(alone[0], got[2])
    # Rows that filter nothing, without a filtering row in the Run: the graph's branch that sorts
    # nothing gives what the sorting branch gave them (rows 0 and 1: greedy and temperature 0.8).
    plain, _ = e.generate(tokens[:2], take(state, [0, 1]), u[:2], t[:2], kk[:2], p[:2])
    assert np.array_equal(plain, got[:2])


def test_generate_marks_nan_rows_and_checks_shapes(engines):
    e = engines["gru"]
    with pytest.raises(ValueError, match="u must be float64"):
        e.generate(np.zeros((2, 1), np.int64), e.initial_state(2), np.zeros((3, 4)), np.ones(2),
                   np.zeros(2, np.int64), np.ones(2))


def test_available_cores_is_at_least_one_and_at_most_the_affinity():
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))
