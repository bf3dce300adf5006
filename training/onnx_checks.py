"""Checks an exported ONNX graph must pass before it is published: symbolic dims and parity with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from nextchar.training.config import ModelConfig
from nextchar.training.model import CharModel
from nextchar.v1 import manifest_pb2

# (batch, seq): one step, a batched step, a long prompt, and an odd mixed shape.
PARITY_SHAPES = ((1, 1), (8, 1), (1, 100), (3, 17))
PARITY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that was refused or failed its checks; nothing was published."""


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with one thread: export runs beside training and tests on shared cores."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_symbolic_dims(graph: onnx.ModelProto, config: ModelConfig, io: manifest_pb2.IoNames) -> None:
    """Fail unless batch and seq are symbolic and every fixed dimension matches the config."""
    B, T = "batch", "seq"  # sentinels: "this dimension must be symbolic"
    L, H, V = config.num_layers, config.hidden_size, config.vocab_size
    want = {io.tokens: (B, T), io.h0: (L, B, H), io.logits: (B, T, V), io.hn: (L, B, H)}
    if io.c0:
        want.update({io.c0: (L, B, H), io.cn: (L, B, H)})
    values = {v.name: v for v in [*graph.graph.input, *graph.graph.output]}
    for name, dims in want.items():
        if name not in values:
            raise ExportError(f"exported graph has no input/output named {name!r}")
        shape = values[name].type.tensor_type.shape.dim
        got = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in shape)
        ok = len(got) == len(dims) and all(
            (isinstance(w, str) and isinstance(g, str) and g) or (isinstance(w, int) and g == w)
            for w, g in zip(dims, got, strict=False)
        )
        if not ok:
            raise ExportError(
                f"exported {name!r} has shape {list(got)}; expected {list(dims)} with batch and seq symbolic"
            )


def parity_check(path: Path, model: CharModel, io: manifest_pb2.IoNames) -> float:
    """Max abs difference of logits and states, onnxruntime vs torch, over PARITY_SHAPES.

    Raises ExportError above PARITY_TOLERANCE: a graph that disagrees with its model is never published.
    """
    c = model.config
    sess = session(path)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, seq in PARITY_SHAPES:
        tokens = torch.randint(0, c.vocab_size, (batch, seq), generator=gen)
        # Random non-zero states: a zero state would hide a graph that ignores its state inputs.
        state = tuple(torch.randn((c.num_layers, batch, c.hidden_size), generator=gen) * 0.5
                      for _ in range(2 if c.has_cell_state else 1))
        with torch.no_grad():
            want = model(tokens, state)
        want = [want[0], *want[1]]
        feeds = {io.tokens: tokens.numpy(), io.h0: state[0].numpy()}
        outputs = [io.logits, io.hn]
        if c.has_cell_state:
            feeds[io.c0] = state[1].numpy()
            outputs.append(io.cn)
        got = sess.run(outputs, feeds)
        for out_name, w, g in zip(outputs, want, got, strict=True):
            if g.shape != tuple(w.shape):
                raise ExportError(
                    f"parity: {out_name} has shape {g.shape} in onnxruntime, {tuple(w.shape)} in torch"
                )
            diff = float(np.max(np.abs(w.numpy() - g)))
            if not diff <= PARITY_TOLERANCE:  # `not <=` also catches NaN
                raise ExportError(
                    f"parity: {out_name} differs by {diff:.3g} (> {PARITY_TOLERANCE}) "
                    f"at batch={batch}, seq={seq}"
                )
            worst = max(worst, diff)
    return worst


def check_generation_graph(model_path: Path, generation_path: Path, io: manifest_pb2.IoNames,
                           config: ModelConfig, k: int = 12) -> None:
    """The generation graph must reproduce the per-step loop of model.onnx bitwise: greedy tokens
    (argmax of each step's logits) and the final states; and K chars in one Run must equal two Runs
    of K/2 for sampled rows (temperature, top-k, top-p). Raises ExportError otherwise."""
    step, gen = session(model_path), session(generation_path)
    rng = np.random.default_rng(0)
    batch = 3
    tokens = rng.integers(0, config.vocab_size, (batch, 5))
    state = [rng.standard_normal((config.num_layers, batch, config.hidden_size)).astype(np.float32) * 0.5
             for _ in range(2 if config.has_cell_state else 1)]
    state_in, state_out = [io.h0, io.c0][:len(state)], [io.hn, io.cn][:len(state)]

    def run_gen(x: np.ndarray, s: list[np.ndarray], u: np.ndarray, t: float) -> list[np.ndarray]:
        feeds = {io.tokens: x, **dict(zip(state_in, s, strict=True)), "u": u,
                 "temperature": np.full(batch, t), "top_k": np.array([0, 5, 0]),
                 "top_p": np.array([1.0, 1.0, 0.9])}
        return gen.run(None, feeds)

    u = rng.random((batch, k))
    greedy, *greedy_state = run_gen(tokens, state, u, 0.0)
    x, s, want = tokens, state, []
    for _ in range(k):
        logits, *s = step.run([io.logits, *state_out], {io.tokens: x, **dict(zip(state_in, s, strict=True))})
        x = logits[:, -1].argmax(axis=1)[:, None]
        want.append(x[:, 0])
    # The graph's final state has stepped the first K-1 sampled chars, like the loop above.
    if not np.array_equal(greedy, np.stack(want, axis=1)) or not all(
            np.array_equal(a, b) for a, b in zip(greedy_state, s, strict=True)):
        raise ExportError(f"{generation_path.name}: greedy tokens or states differ from the per-step loop")
    full = run_gen(tokens, state, u, 0.8)
    half = run_gen(tokens, state, u[:, :k // 2], 0.8)
    rest = run_gen(half[0][:, -1:], half[1:], u[:, k // 2:], 0.8)
    if not np.array_equal(full[0], np.concatenate([half[0], rest[0]], axis=1)):
        raise ExportError(f"{generation_path.name}: K={k} chars differ from two runs of {k // 2}")
