"""onnxruntime's LSTM op against the same cell written as MatMul + elementwise nodes, one step (T = 1).

Usage: .venv/bin/python -m bench.bench_cell_forms [--repo DIR] [--rounds 5]

Reads an exported 2-layer LSTM (`<repo>/lstm256/1/model.onnx`, bench.common's export when no --repo),
rebuilds its step as: the first layer's input weights gathered by token (its input is one-hot), one
MatMul per layer for the recurrent (and second layer's input) part, the gates by Split + Sigmoid/Tanh, then
the output projection. Prints, per batch size, the microseconds of one Run of each form (one intra-op
thread, best of `rounds` x 200 Runs), their ratio and the largest logit/state difference. The question it
answers: is the exported graph's LSTM op the cost to cut (issue 10), or does a step already run near
what the multiply-adds need?
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from bench.common import machine, scratch_repo


def matmul_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported LSTM-256 x2 step as MatMul + elementwise nodes (same inputs and outputs)."""
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    lstm = [n for n in model.graph.node if n.op_type == "LSTM"]
    (w1, r1, b1), (w2, r2, b2) = ((w[n.input[1]][0], w[n.input[2]][0], w[n.input[3]][0]) for n in lstm)
    fc = next(w[n.input[1]] for n in model.graph.node if n.op_type == "MatMul")
    fb = next(w[n.input[0]] for n in model.graph.node if n.op_type == "Add" and n.output[0] == "logits")
    h = r1.shape[1]
    gates = 4 * h
    const = [
        numpy_helper.from_array((w1.T + b1[:gates] + b1[gates:]).astype(np.float32), "w1t_b"),  # [V, 4H]
        numpy_helper.from_array(np.ascontiguousarray(r1.T), "r1t"),                            # [H, 4H]
        numpy_helper.from_array(np.ascontiguousarray(np.concatenate([w2.T, r2.T])), "wr2t"),    # [2H, 4H]
        numpy_helper.from_array((b2[:gates] + b2[gates:]).astype(np.float32), "b2"),
        numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(fb, "fb"),
        numpy_helper.from_array(np.array([0], np.int64), "i0"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array([h] * 4, np.int64), "split4"),
    ]
    n = helper.make_node

    def cell(p: str, g: str, c_prev: str) -> list[onnx.NodeProto]:  # ONNX gate order i, o, f, c
        return [n("Split", [g, "split4"], [p + "i", p + "o", p + "f", p + "g"], axis=1),
                n("Sigmoid", [p + "i"], [p + "si"]), n("Sigmoid", [p + "o"], [p + "so"]),
                n("Sigmoid", [p + "f"], [p + "sf"]), n("Tanh", [p + "g"], [p + "tg"]),
                n("Mul", [p + "sf", c_prev], [p + "fc"]), n("Mul", [p + "si", p + "tg"], [p + "ig"]),
                n("Add", [p + "fc", p + "ig"], [p + "c"]), n("Tanh", [p + "c"], [p + "tc"]),
                n("Mul", [p + "so", p + "tc"], [p + "h"])]

    def row(src: str, i: str, out: str) -> list[onnx.NodeProto]:
        return [n("Gather", [src, i], [out + "3"], axis=0), n("Squeeze", [out + "3", "i0"], [out])]

    nodes = [n("Squeeze", ["tokens", "i1"], ["tok"]), n("Gather", ["w1t_b", "tok"], ["xw1"], axis=0),
             *row("h0", "i0", "h1p"), *row("h0", "i1", "h2p"),
             *row("c0", "i0", "c1p"), *row("c0", "i1", "c2p"),
             n("MatMul", ["h1p", "r1t"], ["hr1"]), n("Add", ["xw1", "hr1"], ["g1"]),
             *cell("l1/", "g1", "c1p"),
             n("Concat", ["l1/h", "h2p"], ["x2"], axis=1), n("MatMul", ["x2", "wr2t"], ["g2a"]),
             n("Add", ["g2a", "b2"], ["g2"]), *cell("l2/", "g2", "c2p"),
             n("MatMul", ["l2/h", "fc"], ["lg"]), n("Add", ["lg", "fb"], ["lg2"]),
             n("Unsqueeze", ["lg2", "i1"], ["logits"])]
    for name, layers in (("hn", ("l1/h", "l2/h")), ("cn", ("l1/c", "l2/c"))):
        nodes += [n("Unsqueeze", [x, "i0"], [x + "u"]) for x in layers]
        nodes.append(n("Concat", [x + "u" for x in layers], [name], axis=0))
    f32 = TP.FLOAT
    graph = helper.make_graph(
        nodes, "matmul_cell",
        [helper.make_tensor_value_info("tokens", TP.INT64, ["B", 1]),
         helper.make_tensor_value_info("h0", f32, [2, "B", h]),
         helper.make_tensor_value_info("c0", f32, [2, "B", h])],
        [helper.make_tensor_value_info(o, f32, None) for o in ("logits", "hn", "cn")], const)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out.ir_version = model.ir_version
    return out


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    print(f"Machine: {machine()}")
    with scratch_repo(a.repo, ("lstm",)) as repo:
        exported = onnx.load(str(repo / "lstm256" / "1" / "model.onnx"))
    op, mm = session(exported), session(matmul_form(exported))
    vocab = exported.graph.output[0].type.tensor_type.shape.dim[2].dim_value or 65
    rng = np.random.default_rng(0)
    for batch in (1, 4, 32, 64):
        feed = {"tokens": rng.integers(0, vocab, (batch, 1)).astype(np.int64),
                "h0": rng.standard_normal((2, batch, 256)).astype(np.float32) * 0.5,
                "c0": rng.standard_normal((2, batch, 256)).astype(np.float32) * 0.5}
        pairs = zip(op.run(None, feed), mm.run(None, feed), strict=True)
        diff = max(float(np.abs(x - y).max()) for x, y in pairs)
        best = []
        for s in (op, mm):
            times = []
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                for _ in range(200):
                    s.run(None, feed)
                times.append((time.perf_counter() - t0) / 200)
            best.append(min(times))
        print(f"batch {batch:2d}: LSTM op {best[0] * 1e6:7.1f} us, MatMul form {best[1] * 1e6:7.1f} us, "
              f"op / MatMul {best[0] / best[1]:.2f}x, max difference {diff:.1e}")


if __name__ == "__main__":
    main()
