"""The portable exp from ONNX primitive ops is bit-identical in onnxruntime: the recipe for in-graph sampling.

onnxruntime's own `Exp` (double) differs from the portable exp in the last bit on ~11.5 % of inputs here,
so an in-graph sampler must not use it; `exp_nodes` below is the recipe of docs/sampling.md §3 as nodes.
"""

from __future__ import annotations

import numpy as np
import pytest

from nextchar.server.core.sampling import EXP_MIN, EXP_POLY, INVLN2, LN2_HI, LN2_LO, portable_exp

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def exp_nodes(z: str, w: str, prefix: str = "pexp/") -> list:
    """Nodes computing `w = portable_exp(z)` for a float64 tensor `z` of any shape (z <= 0 or -inf)."""
    def const(name: str, value) -> object:
        return helper.make_node("Constant", [], [prefix + name],
                                value=numpy_helper.from_array(np.asarray(value, np.float64), prefix + name))

    def op(kind: str, inputs: list[str], out: str, **attrs) -> object:
        names = [i if i == z else prefix + i for i in inputs]
        return helper.make_node(kind, names, [prefix + out], **attrs)

    nodes = [const("emin", EXP_MIN), const("invln2", INVLN2), const("half", 0.5), const("ln2hi", LN2_HI),
             const("ln2lo", LN2_LO), const("one", 1.0), const("two", 2.0), const("zero", 0.0),
             const("pow2", np.ldexp(1.0, -np.arange(1022))),  # 2^-j, exact: scaling stays exact
             *(const(f"p{i + 1}", p) for i, p in enumerate(EXP_POLY)),
             op("Max", [z, "emin"], "zc"), op("Mul", ["zc", "invln2"], "a"), op("Sub", ["a", "half"], "b"),
             op("Ceil", ["b"], "k"),  # trunc of an argument that is always negative
             op("Mul", ["k", "ln2hi"], "kh"), op("Sub", ["zc", "kh"], "hi"), op("Mul", ["k", "ln2lo"], "lo"),
             op("Sub", ["hi", "lo"], "r"), op("Mul", ["r", "r"], "t"), op("Mul", ["t", "p5"], "h5")]
    prev = "h5"
    for i in (4, 3, 2, 1):  # Horner: ((((t P5 + P4) t + P3) t + P2) t + P1) t
        nodes += [op("Add", [prev, f"p{i}"], f"s{i}"), op("Mul", [f"s{i}", "t"], f"m{i}")]
        prev = f"m{i}"
    nodes += [op("Sub", ["r", prev], "c"), op("Mul", ["r", "c"], "rc"), op("Sub", ["two", "c"], "d"),
              op("Div", ["rc", "d"], "q"), op("Sub", ["lo", "q"], "e"), op("Sub", ["e", "hi"], "f"),
              op("Sub", ["one", "f"], "y"), op("Neg", ["k"], "nk"),
              op("Cast", ["nk"], "j", to=TensorProto.INT64),
              op("Gather", ["pow2", "j"], "scale"), op("Mul", ["y", "scale"], "w0"),
              op("Less", [z, "emin"], "under")]
    nodes.append(helper.make_node("Where", [prefix + "under", prefix + "zero", prefix + "w0"], [w]))
    return nodes


@pytest.mark.parametrize("level", ["ORT_ENABLE_ALL", "ORT_DISABLE_ALL"])
def test_portable_exp_as_onnx_ops_is_bit_identical(level: str) -> None:
    double = TensorProto.DOUBLE
    graph = helper.make_graph(exp_nodes("z", "w"), "portable_exp",
                              [helper.make_tensor_value_info("z", double, [None, None])],
                              [helper.make_tensor_value_info("w", double, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z = np.concatenate([-rng.exponential(3.0, 100_000), -rng.uniform(0, -EXP_MIN, 100_000),
                        [0.0, -0.0, EXP_MIN, np.nextafter(EXP_MIN, -np.inf), -1000.0, -np.inf] * 2])
    z = z.reshape(2, -1)
    got = session.run(None, {"z": z})[0]
    assert np.array_equal(got.view(np.int64), portable_exp(z).view(np.int64))
