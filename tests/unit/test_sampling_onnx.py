"""The portable exp from ONNX primitive ops is bit-identical in onnxruntime: the recipe for in-graph sampling.

onnxruntime's own `Exp` (double) differs from the portable exp in the last bit on ~11.5 % of inputs here,
so the generation graph uses `kstep.exp_nodes`, the recipe of docs/sampling.md §3 as nodes.
"""

from __future__ import annotations

import numpy as np
import pytest

from nextchar.server.core.sampling import EXP_MIN, portable_exp

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from nextchar.server.core.kstep import exp_nodes  # noqa: E402


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
