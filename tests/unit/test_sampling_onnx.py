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


def _sampling_session(vocab: int) -> ort.InferenceSession:
    """The generation graph's sampling nodes alone: logits float32[B, 1, V] + the row parameters -> tokens."""
    from nextchar.server.core.kstep import _row_nodes, _sampling_nodes

    double, i64 = TensorProto.DOUBLE, TensorProto.INT64
    step = helper.make_node("Constant", [], ["step"], value=helper.make_tensor("step", i64, [], [0]))
    graph = helper.make_graph(
        [*_row_nodes(vocab), step, *_sampling_nodes("logits", "step", "tok", vocab)], "sampling",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, vocab]),
         helper.make_tensor_value_info("u", double, [None, 1]),
         helper.make_tensor_value_info("temperature", double, [None]),
         helper.make_tensor_value_info("top_k", i64, [None]),
         helper.make_tensor_value_info("top_p", double, [None])],
        [helper.make_tensor_value_info("tok", i64, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_in_graph_sampling_equals_sample_rows_sorting_or_not() -> None:
    """The rule's nodes (the If that sorts only when a row of the Run filters, the argmax for greedy rows
    and infinite maxima, NaN rows -> -1) pick what `sample_rows` picks, row for row, in batches with and
    without a filtering row."""
    from test_sampling import random_case

    from nextchar.server.core.sampling import SamplingParams, filters, sample_rows

    rng = np.random.default_rng(11)
    sorted_runs = unsorted_runs = 0
    for trial in range(80):
        rows, vocab = int(rng.integers(1, 65)), int(rng.choice([2, 3, 17, 60, 97]))
        logits, params, u = random_case(rng, rows, vocab)
        if trial % 2:  # no row filters: the branch that sorts nothing
            params = [SamplingParams(temperature=p.temperature) for p in params]
        logits[5::23, 0] = np.nan
        any_filter = any(filters(p, vocab) for p in params)
        sorted_runs += any_filter
        unsorted_runs += not any_filter
        got = _sampling_session(vocab).run(None, {
            "logits": logits[:, None, :], "u": u[:, None],
            "temperature": np.array([p.temperature for p in params]),
            "top_k": np.array([p.top_k for p in params], np.int64),
            "top_p": np.array([p.top_p for p in params])})[0][:, 0]
        want = sample_rows(logits, params, u)
        assert got.tolist() == want.tolist(), f"trial {trial}"
    assert sorted_runs >= 30 and unsorted_runs >= 30
