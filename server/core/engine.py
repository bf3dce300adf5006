"""The only onnxruntime caller: a model session, checked against its manifest, stepped with explicit state."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nextchar.server.core import artifact as art
from nextchar.server.core.artifact import Artifact, ArtifactError
from nextchar.server.core.contract import GENERATION_INPUTS, GENERATION_OUTPUT, State, take
from nextchar.server.core.vocab import build_index
from nextchar.v1 import manifest_pb2

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 `cpu.max` quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 file (macOS, cgroup v1): the affinity mask decides
        pass
    return max(1, cores)


def _session(model: Path | bytes, intra_op_threads: int, inter_op_threads: int, *,
             where: object = None) -> ort.InferenceSession:
    """A session of `model` (a serialized graph, or a file); `where` names it in errors.

    intra_op_threads 0 = available_cores(): one call uses the machine, since the batcher puts
    every stream of a model into few calls (1 and 2 threads give bitwise-identical outputs)."""
    opts = ort.SessionOptions()
    intra_op_threads = intra_op_threads or available_cores()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads must not spin: the host runs several models and the gRPC loop.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    if where is None:
        where = "its generation graph" if isinstance(model, bytes) else model
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types for unreadable graphs
        raise ArtifactError(f"{where}: onnxruntime cannot load it: {e}") from None


def _model_session(artifact: Artifact, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    """The one-step session, from the hash-checked bytes (never the file again, which may have been
    replaced since the check)."""
    return _session(artifact.model_bytes, intra_op_threads, inter_op_threads, where=artifact.model_path)


def _generation_session(artifact: Artifact, intra_op_threads: int,
                        inter_op_threads: int) -> ort.InferenceSession:
    """The K-step graph, built from the one-step model's hash-checked bytes (never the file again,
    which may have been replaced since): old artifacts need no re-export."""
    import onnx  # here, not at the top: the offline client steps per char and never needs it

    from nextchar.server.core.kstep import build_generation_graph

    io_map = {k: getattr(artifact.manifest.io, k) for k in ("tokens", "h0", "c0", "logits", "hn", "cn")}
    try:
        graph = build_generation_graph(onnx.load_model_from_string(artifact.model_bytes), io_map)
    except (KeyError, ValueError) as e:
        raise ArtifactError(f"{artifact.model_path}: cannot build its generation graph: {e}") from None
    return _session(graph.SerializeToString(), intra_op_threads, inter_op_threads)


class Engine:
    """One loaded model version: `step(tokens int64[B, T], state) -> (logits float32[B, T, V], state)`.

    The session is safe to call from several threads at once; onnxruntime releases the GIL in run().
    """

    def __init__(self, artifact: Artifact, session: ort.InferenceSession, *, intra_op_threads: int = 0,
                 inter_op_threads: int = 1, generation: bool = True) -> None:
        self.artifact = artifact
        self.name = artifact.name
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
        self._gen_outputs = [GENERATION_OUTPUT, *self._outputs[1:]]
        # Set by warmup(): see _probe_batch_invariance.
        self.pad_single_rows = False
        self.batch_invariant: bool | None = None
        self._check_graph()
        self._auto_threads = intra_op_threads == 0 and available_cores() > 1
        self.intra_op_threads = intra_op_threads or available_cores()
        self._threads = (self.intra_op_threads, inter_op_threads)
        # The K-step session: built now for a server (a bad graph fails the load), on first use else.
        self._generation: ort.InferenceSession | None = None
        if generation:
            self._generation_session()

    @classmethod
    def load(cls, artifact: Artifact, *, intra_op_threads: int = 0, inter_op_threads: int = 1) -> Engine:
        """Create the sessions from `artifact.model_bytes` (the bytes load_artifact checked, not the
        file again) and check the graph against the manifest. intra_op_threads 0 = available_cores()."""
        session = _model_session(artifact, intra_op_threads, inter_op_threads)
        return cls(artifact, session, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)

    @classmethod
    def from_file(cls, path: Path, *, intra_op_threads: int = 0, inter_op_threads: int = 1) -> Engine:
        """Load a bare model.onnx: manifest and vocab come from its metadata, no manifest.json needed."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such model file")
        try:
            model_bytes = path.read_bytes()  # read once: the session and generation graph share them
        except OSError as e:
            raise ArtifactError(f"{path}: unreadable: {e}") from None
        session = _session(model_bytes, intra_op_threads, inter_op_threads, where=path)
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
                            model_path=path, manifest=manifest, vocab=vocab, model_bytes=model_bytes)
        return cls(artifact, session, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                   generation=False)

    def _generation_session(self) -> ort.InferenceSession:
        if self._generation is None:
            self._generation = _generation_session(self.artifact, *self._threads)
        return self._generation

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
        self._check(tokens, state)
        if tokens.shape[0] == 1 and self.pad_single_rows:
            logits, new = self._run(np.repeat(tokens, 2, axis=0), take(state, [0, 0]))
            return logits[:1], take(new, slice(0, 1))
        return self._run(tokens, state)

    def _check(self, tokens: np.ndarray, state: State) -> None:
        if tokens.dtype != np.int64 or tokens.ndim != 2 or 0 in tokens.shape:
            raise ValueError(f"tokens must be int64[B, T] with B, T >= 1, got {tokens.dtype}{tokens.shape}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        want = (self.num_layers, tokens.shape[0], self.hidden_size)
        if len(state) != len(self._inputs) - 1 or any(s.shape != want for s in state):
            raise ValueError(f"state must be {len(self._inputs) - 1} float32{want}, "
                             f"got {[s.shape for s in state]}")

    def generate(self, tokens: np.ndarray, state: State, u: np.ndarray, temperature: np.ndarray,
                 top_k: np.ndarray, top_p: np.ndarray) -> tuple[np.ndarray, State]:
        """K chars per row in one Run of the generation graph (see contract.ModelEngine.generate):
        tokens int64[B, T], u float64[B, K], temperature/top_p float64[B], top_k int64[B]
        -> (int64[B, K], state)."""
        self._check(tokens, state)
        b = tokens.shape[0]
        params = [np.asarray(u, np.float64), np.asarray(temperature, np.float64),
                  np.asarray(top_k, np.int64), np.asarray(top_p, np.float64)]
        if params[0].ndim != 2 or params[0].shape[0] != b or params[0].shape[1] < 1 or any(
                p.shape != (b,) for p in params[1:]):
            raise ValueError(f"u must be float64[{b}, K>=1] and temperature/top_k/top_p [{b}], got "
                             f"{[p.shape for p in params]}")
        if b == 1 and self.pad_single_rows:
            out, new = self._generate(np.repeat(tokens, 2, axis=0), take(state, [0, 0]),
                                      [np.repeat(p, 2, axis=0) for p in params])
            return out[:1], take(new, slice(0, 1))
        return self._generate(tokens, state, params)

    def _generate(self, tokens: np.ndarray, state: State,
                  params: list[np.ndarray]) -> tuple[np.ndarray, State]:
        feed = {self._inputs[0]: np.ascontiguousarray(tokens)}
        for name, s in zip(self._inputs[1:], state, strict=True):
            feed[name] = np.ascontiguousarray(s, dtype=np.float32)
        feed.update(zip(GENERATION_INPUTS, params, strict=True))
        out, *new = self._generation_session().run(self._gen_outputs, feed)
        return out, tuple(new)

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
        if self._generation is None:  # an offline engine: its generation graph is built on first use
            self._probe_batch_invariance()
            return
        if self._auto_threads:
            self._choose_threads()
        ones = np.ones(2)
        out, _ = self.generate(np.zeros((2, 3), np.int64), self.initial_state(2), np.full((2, 4), 0.5),
                               ones, np.zeros(2, np.int64), ones)
        if out.shape != (2, 4) or out.min() < 0 or out.max() >= self.vocab_size:
            raise ArtifactError(f"{self.artifact.model_path}: the generation graph returned {out.shape} "
                                f"tokens in [{out.min()}, {out.max()}], expected (2, 4) ids in the vocab")
        self._probe_batch_invariance()

    def _choose_threads(self, batch: int = 64, k: int = 8, rounds: int = 3) -> None:
        """intra_op_threads 0: all available cores, unless one thread runs a batch-`batch` generation
        call faster (interleaved, best of `rounds`). Measured, not assumed: on 2 loaded cores GRU-256
        took 5x the CPU per step with 2 threads (onnxruntime's GRU kernel splits a step into tiny tasks)
        while LSTM gained 1.7x on an idle box."""
        one = _generation_session(self.artifact, 1, self._threads[1])
        many = self._generation_session()
        tokens, state = np.zeros((batch, 1), np.int64), self.initial_state(batch)
        feed = {self._inputs[0]: tokens, **dict(zip(self._inputs[1:], state, strict=True)),
                **dict(zip(GENERATION_INPUTS, (np.full((batch, k), 0.5), np.full(batch, 0.8),
                                               np.zeros(batch, np.int64), np.ones(batch)), strict=True))}
        best = {1: float("inf"), self.intra_op_threads: float("inf")}
        for r in range(rounds + 1):  # round 0 warms both up
            for threads, session in ((1, one), (self.intra_op_threads, many)):
                t0 = time.perf_counter()
                session.run(self._gen_outputs, feed)
                if r:
                    best[threads] = min(best[threads], time.perf_counter() - t0)
        if best[1] < best[self.intra_op_threads]:
            self.intra_op_threads = 1
            self._threads = (1, self._threads[1])
            self._generation = one
            self.session = _model_session(self.artifact, 1, self._threads[1])
        log.info("%s: %d onnxruntime thread(s) per call (a batch-%d call of %d chars: %s)", self.name,
                 self.intra_op_threads, batch, k,
                 ", ".join(f"{t} thread(s) {s * 1e3:.1f} ms" for t, s in best.items()))

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
        return self._run(tokens[rows], take(state, rows))


def _same_row0(a: tuple[np.ndarray, State], b: tuple[np.ndarray, State]) -> bool:
    """Are row 0's logits and state bit-identical in the two step results?"""
    return np.array_equal(a[0][0], b[0][0]) and all(
        np.array_equal(x[:, 0], y[:, 0]) for x, y in zip(a[1], b[1], strict=True))
