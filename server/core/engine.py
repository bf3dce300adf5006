"""The only onnxruntime caller: a model session, checked against its manifest, stepped with explicit state."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nextchar.server.core import artifact as art
from nextchar.server.core.artifact import Artifact, ArtifactError
from nextchar.server.core.vocab import build_index
from nextchar.v1 import manifest_pb2

State = tuple[np.ndarray, ...]  # (h,) or (h, c), each float32[num_layers, B, hidden_size]


def _session(path: Path, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads must not spin: the host runs several models and the gRPC loop.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types for unreadable graphs
        raise ArtifactError(f"{path}: onnxruntime cannot load it: {e}") from None


class Engine:
    """One loaded model version: `step(tokens int64[B, T], state) -> (logits float32[B, T, V], state)`.

    The session is safe to call from several threads at once; onnxruntime releases the GIL in run().
    """

    def __init__(self, artifact: Artifact, session: ort.InferenceSession) -> None:
        self.artifact = artifact
        self.session = session
        m = artifact.manifest
        self.vocab: tuple[str, ...] = artifact.vocab
        self.vocab_index: dict[str, int] = build_index(self.vocab)
        self.vocab_size = len(self.vocab)
        self.num_layers = m.architecture.num_layers
        self.hidden_size = m.architecture.hidden_size
        self.has_cell_state = m.architecture.cell == manifest_pb2.CELL_TYPE_LSTM
        io = m.io
        self._inputs = [io.tokens, io.h0] + ([io.c0] if self.has_cell_state else [])
        self._outputs = [io.logits, io.hn] + ([io.cn] if self.has_cell_state else [])
        # Set by warmup(): see _probe_batch_invariance.
        self.pad_single_rows = False
        self.batch_invariant: bool | None = None
        self._check_graph()

    @classmethod
    def load(cls, artifact: Artifact, *, intra_op_threads: int = 1, inter_op_threads: int = 1) -> Engine:
        """Create the session for `artifact.model_path` and check the graph against the manifest."""
        return cls(artifact, _session(artifact.model_path, intra_op_threads, inter_op_threads))

    @classmethod
    def from_file(cls, path: Path, *, intra_op_threads: int = 1, inter_op_threads: int = 1) -> Engine:
        """Load a bare model.onnx: manifest and vocab come from its metadata, no manifest.json needed."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such model file")
        session = _session(path, intra_op_threads, inter_op_threads)
        meta = session.get_modelmeta().custom_metadata_map
        for key in (art.META_MANIFEST, art.META_VOCAB):
            if key not in meta:
                raise ArtifactError(f"{path}: metadata has no {key!r}; was it exported by nextchar?")
        manifest = art.manifest_from_json(meta[art.META_MANIFEST], f"{path} metadata {art.META_MANIFEST}")
        try:
            vocab = tuple(json.loads(meta[art.META_VOCAB]))
        except ValueError as e:
            raise ArtifactError(f"{path}: metadata {art.META_VOCAB!r} is not JSON: {e}") from None
        if any(not isinstance(c, str) or len(c) != 1 for c in vocab) or len(set(vocab)) != len(vocab):
            raise ArtifactError(f"{path}: metadata vocab must be distinct single characters")
        if vocab != tuple(manifest.vocab):
            raise ArtifactError(f"{path}: metadata vocab and manifest vocab disagree")
        if manifest.architecture.vocab_size != len(vocab):
            raise ArtifactError(f"{path}: manifest vocab_size {manifest.architecture.vocab_size} "
                                f"!= {len(vocab)} vocab characters")
        artifact = Artifact(name=manifest.name, version=manifest.version, path=path.parent,
                            model_path=path, manifest=manifest, vocab=vocab)
        return cls(artifact, session)

    def _check_graph(self) -> None:
        where = str(self.artifact.model_path)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if set(inputs) != set(self._inputs):
            raise ArtifactError(
                f"{where}: graph inputs {sorted(inputs)} != the manifest's {sorted(self._inputs)}")
        missing = set(self._outputs) - set(outputs)
        if missing:
            raise ArtifactError(f"{where}: graph lacks outputs {sorted(missing)} named by the manifest")
        tokens = inputs[self._inputs[0]]
        if tokens.type != "tensor(int64)" or len(tokens.shape) != 2:
            raise ArtifactError(f"{where}: input {tokens.name!r} is {tokens.type}{tokens.shape}, "
                                "expected int64[batch, seq]")
        logits = outputs[self._outputs[0]]
        if logits.type != "tensor(float)" or len(logits.shape) != 3 or (
            isinstance(logits.shape[2], int) and logits.shape[2] != self.vocab_size
        ):
            raise ArtifactError(f"{where}: output {logits.name!r} is {logits.type}{logits.shape}, "
                                f"expected float[batch, seq, {self.vocab_size}] (the vocab size)")
        want = [self.num_layers, None, self.hidden_size]
        for t in [inputs[n] for n in self._inputs[1:]] + [outputs[n] for n in self._outputs[1:]]:
            dims_ok = len(t.shape) == 3 and all(
                w is None or not isinstance(d, int) or d == w for d, w in zip(t.shape, want, strict=True))
            if t.type != "tensor(float)" or not dims_ok:
                raise ArtifactError(f"{where}: state {t.name!r} is {t.type}{t.shape}, expected "
                                    f"float[{self.num_layers}, batch, {self.hidden_size}]")

    def initial_state(self, batch: int) -> State:
        """Zero state for `batch` streams."""
        shape = (self.num_layers, batch, self.hidden_size)
        return tuple(np.zeros(shape, np.float32) for _ in range(2 if self.has_cell_state else 1))

    def step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """tokens: int64[B, T], state: float32[L, B, H] each -> (logits float32[B, T, V], new state)."""
        if tokens.dtype != np.int64 or tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"tokens must be int64[B, T] with B, T >= 1, got {tokens.dtype}{tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        want = (self.num_layers, tokens.shape[0], self.hidden_size)
        if len(state) != len(self._inputs) - 1 or any(s.shape != want for s in state):
            raise ValueError(f"state must be {len(self._inputs) - 1} float32{want}, "
                             f"got {[s.shape for s in state]}")
        if tokens.shape[0] == 1 and self.pad_single_rows:
            logits, new = self._run(np.repeat(tokens, 2, axis=0), self.take(state, [0, 0]))
            return logits[:1], self.take(new, slice(0, 1))
        return self._run(tokens, state)

    def _run(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        feed = {self._inputs[0]: np.ascontiguousarray(tokens)}
        for name, s in zip(self._inputs[1:], state, strict=True):
            feed[name] = np.ascontiguousarray(s, dtype=np.float32)
        logits, *new = self.session.run(self._outputs, feed)
        return logits, tuple(new)

    def warmup(self) -> None:
        """Run a prompt-shaped and a batched-step-shaped call; check the real output shapes."""
        for batch, seq in ((1, 8), (2, 1)):
            tokens = np.zeros((batch, seq), np.int64)
            logits, state = self.step(tokens, self.initial_state(batch))
            shapes = [logits.shape] + [s.shape for s in state]
            want = [(batch, seq, self.vocab_size)] + [(self.num_layers, batch, self.hidden_size)] * len(state)
            if shapes != want:
                raise ArtifactError(
                    f"{self.artifact.model_path}: outputs have shapes {shapes}, expected {want}")
            if not np.isfinite(logits).all():
                raise ArtifactError(f"{self.artifact.model_path}: warm-up logits are not finite")
        self._probe_batch_invariance()

    def _probe_batch_invariance(self) -> None:
        """Decide `pad_single_rows` and `batch_invariant` by experiment, not by cell type.

        onnxruntime (1.32, CPU) computes a batch of one with other kernels than a larger batch for
        some ops (the ONNX RNN op: ~1e-7 differences), and dynamically quantized (int8) graphs
        quantize with per-tensor scales, so a row's logits depend on its batch mates. If a lone row
        differs from the same row in a batch of two, every lone row is run as a pair from then on;
        `batch_invariant` says whether a row is then bit-identical alone and among any batch mates.
        """
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, self.vocab_size, (4, 6))
        state = self.initial_state(4)
        self.pad_single_rows, invariant = False, True
        for chunk in (tokens[:, :5], tokens[:, 5:]):  # a prefill, then a one-char step from its state
            reference = self._rows(chunk, state, [0, 1, 2])
            if not _same_row0(self._rows(chunk, state, [0]), self._rows(chunk, state, [0, 1])):
                self.pad_single_rows = True
            lone = self._rows(chunk, state, [0, 0] if self.pad_single_rows else [0])
            others = (self._rows(chunk, state, [0, 1]), self._rows(chunk, state, [0, 3, 2]))
            invariant &= all(_same_row0(r, reference) for r in (lone, *others))
            state = self._rows(chunk, state, [0, 1, 2, 3])[1]
        self.batch_invariant = invariant
        # Pairs only pay when they buy invariance (int8 stays batch-dependent either way).
        self.pad_single_rows = self.pad_single_rows and invariant

    def _rows(self, tokens: np.ndarray, state: State, rows: list[int]) -> tuple[np.ndarray, State]:
        return self._run(tokens[rows], self.take(state, rows))

    # Batching helpers: a stream is a row (axis 1) of the state tensors.
    @staticmethod
    def take(state: State, rows: Sequence[int] | np.ndarray | slice) -> State:
        """The state rows `rows` as a new batch: float32[L, len(rows), H] each."""
        return tuple(s[:, rows, :] for s in state)

    @staticmethod
    def concat_states(states: Sequence[State]) -> State:
        """Stack per-stream states along the batch axis, in order."""
        return tuple(np.concatenate(parts, axis=1) for parts in zip(*states, strict=True))


def _same_row0(a: tuple[np.ndarray, State], b: tuple[np.ndarray, State]) -> bool:
    """Are row 0's logits and state bit-identical in the two step results?"""
    return np.array_equal(a[0][0], b[0][0]) and all(
        np.array_equal(x[:, 0], y[:, 0]) for x, y in zip(a[1], b[1], strict=True))
