"""The generation graph: an ONNX Loop over the one-step model plus in-graph sampling, K chars per Run.

    tokens int64[B, T], h0 (, c0) float32[L, B, H], u float64[B, K], temperature float64[B],
    top_k int64[B], top_p float64[B]  ->  new_tokens int64[B, K], hn (, cn)

Iteration 0 steps the whole `tokens` (a prompt, or the last sampled char: T = 1); every later
iteration steps the char it sampled. Iteration i samples with u[:, i] by the portable rule of
docs/sampling.md (float64; greedy rows take the argmax, and only when a row of the Run filters
(top_k < V or top_p < 1) does an If sort the rows; a row whose logits hold NaN gets
-1 and is fed 0 from then on, its caller fails it). So K chars cost one Run and the GIL is held
only around it, and the uniforms come from (seed, draw index) per row: the text is the same for any
K and any batch mates. `build_generation_graph(model)` is the one function every runtime uses
(the exporter writes its output as generate.onnx; the server builds it in memory from the hashed
model.onnx, so artifacts exported before it existed work too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nextchar.server.core.contract import GENERATION_OUTPUT as OUTPUT_TOKENS
from nextchar.server.core.sampling import EXP_MIN, EXP_POLY, INVLN2, LN2_HI, LN2_LO

GENERATION_FILE = "generate.onnx"
_P = "gen/"  # prefix of every value the builder defines: must not collide with the model's names
_D = TensorProto.DOUBLE
_I = TensorProto.INT64


def _const(name: str, value: float | int | list, dtype: int) -> onnx.NodeProto:
    dims = [len(value)] if isinstance(value, list) else []
    vals = value if isinstance(value, list) else [value]
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def _row_nodes(vocab_size: int) -> list[onnx.NodeProto]:
    """What depends on each row's parameters only, computed once per Run outside the Loop (each node
    in the Loop body costs ~1-2 us per iteration, which is most of an iteration at batch 1)."""
    r = _P + "r/"
    n = helper.make_node
    return [
        _const(r + "ax1", [1], _I), _const(r + "zero_d", 0.0, _D), _const(r + "one_d", 1.0, _D),
        _const(r + "zero", 0, _I), _const(r + "one", 1, _I), _const(r + "V", vocab_size, _I),
        _const(r + "j", list(range(vocab_size)), _I),                      # [V]: sorted positions
        n("Unsqueeze", ["temperature", r + "ax1"], [r + "T"]),             # [B, 1]
        n("Equal", [r + "T", r + "zero_d"], [r + "is_greedy"]),
        n("Where", [r + "is_greedy", r + "one_d", r + "T"], [r + "T_safe"]),
        n("Unsqueeze", ["top_k", r + "ax1"], [r + "k"]),
        n("Min", [r + "k", r + "V"], [r + "k_min"]),
        n("Equal", [r + "k", r + "zero"], [r + "k_off"]),
        n("Where", [r + "k_off", r + "V", r + "k_min"], [r + "n"]),        # candidates per row
        n("Sub", [r + "n", r + "one"], [r + "n_last"]),
        n("Less", [r + "j", r + "n"], [r + "cand"]),                       # [B, V]
        n("Unsqueeze", ["top_p", r + "ax1"], [r + "tp"]),
        n("GreaterOrEqual", [r + "tp", r + "one_d"], [r + "p_off"]),
        # A row filters (top_k < V or top_p < 1) -> descending logit order; else id order, no sort.
        n("GreaterOrEqual", [r + "k", r + "V"], [r + "k_all"]),
        n("Or", [r + "k_off", r + "k_all"], [r + "k_keeps"]),
        n("And", [r + "k_keeps", r + "p_off"], [r + "no_filter"]),
        n("Not", [r + "no_filter"], [r + "filt"]),                         # [B, 1]
        n("Cast", [r + "filt"], [r + "filt_f"], to=TensorProto.FLOAT),
        n("ReduceMax", [r + "filt_f"], [r + "any_filt_f"], keepdims=0),
        n("Cast", [r + "any_filt_f"], [r + "any_filt"], to=TensorProto.BOOL),  # scalar: sort at all?
    ]


def _pick_branch(p: str, vocab_size: int, filtering: bool) -> onnx.GraphProto:
    """The If branches giving the sampled position `pick` int64[B, 1] from the weights `w_all`
    (float64[B, V], id order) and the uniform `u1`. With `filtering`, rows that filter (top-k / top-p)
    are sorted descending (ties to the lower id; in float32, the logits' own type: the same order,
    ~2x faster than float64) and the candidates and top-p nucleus are cut; the others keep id order.
    Without (no row of the Run filters), every row is a plain inverse-CDF draw over the vocabulary in
    id order: the same pick, a third of the nodes."""
    n, r = helper.make_node, _P + "r/"
    q = p + ("filter/" if filtering else "plain/")
    if not filtering:
        nodes = [
            n("CumSum", [p + "w_all", p + "ax1s"], [q + "cum"]),                 # sequential, float64
            n("GatherElements", [q + "cum", r + "n_last"], [q + "cum_last"], axis=1),
            n("Mul", [p + "u1", q + "cum_last"], [q + "thr"]),
            n("LessOrEqual", [q + "cum", q + "thr"], [q + "le"]),
            n("Cast", [q + "le"], [q + "le_i"], to=_I),
            n("ReduceSum", [q + "le_i", p + "ax1"], [q + "count"], keepdims=1),
            n("Min", [r + "n_last", q + "count"], [q + "pick"]),
        ]
        return helper.make_graph(nodes, "plain", [], [helper.make_tensor_value_info(q + "pick", _I, None)])
    nodes = [
        _const(q + "V1", [vocab_size], _I),
        n("TopK", [p + "row32", q + "V1"], [q + "vals_s", q + "order_s"], axis=1, largest=1, sorted=1),
        n("Where", [r + "filt", q + "order_s", r + "j"], [q + "order"]),
        n("GatherElements", [p + "w_all", q + "order"], [q + "w_sorted"], axis=1),  # exp is elementwise
        n("Where", [r + "cand", q + "w_sorted", p + "zero_d"], [q + "w"]),
        n("CumSum", [q + "w", p + "ax1s"], [q + "cum"]),                         # sequential, float64
        n("GatherElements", [q + "cum", r + "n_last"], [q + "total"], axis=1),
        n("Mul", [r + "tp", q + "total"], [q + "mass"]),
        n("Less", [q + "cum", q + "mass"], [q + "below"]),
        n("And", [q + "below", r + "cand"], [q + "below_c"]),
        n("Cast", [q + "below_c"], [q + "below_i"], to=_I),
        n("ReduceSum", [q + "below_i", p + "ax1"], [q + "nbelow"], keepdims=1),
        n("Min", [r + "n_last", q + "nbelow"], [q + "last_p"]),
        n("Where", [r + "p_off", r + "n_last", q + "last_p"], [q + "lastj"]),  # [B, 1]
        n("GatherElements", [q + "cum", q + "lastj"], [q + "cum_last"], axis=1),
        n("Mul", [p + "u1", q + "cum_last"], [q + "thr"]),
        n("LessOrEqual", [q + "cum", q + "thr"], [q + "le"]),
        n("LessOrEqual", [r + "j", q + "lastj"], [q + "upto"]),
        n("And", [q + "le", q + "upto"], [q + "le_c"]),
        n("Cast", [q + "le_c"], [q + "le_i"], to=_I),
        n("ReduceSum", [q + "le_i", p + "ax1"], [q + "count"], keepdims=1),
        n("Min", [q + "lastj", q + "count"], [q + "at"]),
        n("GatherElements", [q + "order", q + "at"], [q + "pick"], axis=1),
    ]
    return helper.make_graph(nodes, "filter", [], [helper.make_tensor_value_info(q + "pick", _I, None)])


def _sampling_nodes(logits: str, step: str, tok_out: str, vocab_size: int) -> list[onnx.NodeProto]:
    """logits float32[B, T, V] (last position used), iteration `step` -> tok_out int64[B, 1]."""
    p, r = _P + "s/", _P + "r/"
    n = helper.make_node
    return [
        _const(p + "last", -1, _I), _const(p + "ax1", [1], _I),
        _const(p + "ax1s", 1, _I), _const(p + "zero_d", 0.0, _D), _const(p + "minus1", -1, _I),
        n("Gather", [logits, p + "last"], [p + "row32"], axis=1),           # [B, V]
        n("IsNaN", [p + "row32"], [p + "isnan"]),
        n("Cast", [p + "isnan"], [p + "isnan_f"], to=TensorProto.FLOAT),
        n("ReduceMax", [p + "isnan_f"], [p + "nan_f"], axes=[1], keepdims=1),  # [B, 1]
        n("Cast", [p + "nan_f"], [p + "nan"], to=TensorProto.BOOL),
        n("Cast", [p + "row32"], [p + "vals"], to=_D),
        n("ReduceMax", [p + "row32"], [p + "x0_32"], axes=[1], keepdims=1),  # [B, 1]
        n("Cast", [p + "x0_32"], [p + "x0"], to=_D),
        n("ArgMax", [p + "row32"], [p + "greedy_tok"], axis=1, keepdims=1, select_last_index=0),
        n("IsInf", [p + "x0"], [p + "inf"]),  # a +inf logit or all -inf: the argmax, as greedy
        n("Or", [r + "is_greedy", p + "inf"], [p + "use_argmax"]),
        n("Sub", [p + "vals", p + "x0"], [p + "d"]),
        n("Div", [p + "d", r + "T_safe"], [p + "z_raw"]),
        # NaN only in rows that answer otherwise (a NaN logit: -1; an infinite maximum, inf - inf: the
        # argmax); 0 keeps the exp's 2^k Gather in range (a NaN index would fail the whole Run).
        n("IsNaN", [p + "z_raw"], [p + "z_nan"]),
        n("Where", [p + "z_nan", p + "zero_d", p + "z_raw"], [p + "z"]),
        *exp_nodes(p + "z", p + "w_all"),                                  # [B, V], id order
        n("Gather", ["u", step], [p + "u"], axis=1),                       # [B]
        n("Unsqueeze", [p + "u", p + "ax1"], [p + "u1"]),
        # Only when a row of the Run filters (top_k < V or top_p < 1) is anything sorted or cut.
        n("If", [r + "any_filt"], [p + "pick"],
          then_branch=_pick_branch(p, vocab_size, True), else_branch=_pick_branch(p, vocab_size, False)),
        n("Where", [p + "use_argmax", p + "greedy_tok", p + "pick"], [p + "tok"]),
        n("Where", [p + "nan", p + "minus1", p + "tok"], [tok_out]),
    ]


def exp_nodes(z: str, w: str, prefix: str = _P + "exp/") -> list[onnx.NodeProto]:
    """Nodes computing `w = sampling.portable_exp(z)` for a float64 tensor `z` of any shape (z <= 0 or -inf).

    onnxruntime's own Exp (double) differs from the portable exp in the last bit on ~11.5 % of inputs,
    so the in-graph rule uses these + - * / nodes (docs/sampling.md §3) and its weights are bit-identical
    to the Python, Node and browser samplers'."""
    def const(name: str, value: object) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [prefix + name],
                                value=numpy_helper.from_array(np.asarray(value, np.float64), prefix + name))

    def op(kind: str, inputs: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
        names = [i if i == z else prefix + i for i in inputs]
        return helper.make_node(kind, names, [prefix + out], **attrs)

    nodes: list[onnx.NodeProto] = [
             const("emin", EXP_MIN), const("invln2", INVLN2), const("half", 0.5), const("ln2hi", LN2_HI),
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



def build_generation_graph(model: onnx.ModelProto, io: dict[str, str]) -> onnx.ModelProto:
    """The K-step generation graph of a one-step `model` whose inputs/outputs are named by `io`
    (keys tokens, h0, c0, logits, hn, cn; c0/cn empty without a cell state). The metadata is kept.
    """
    g = model.graph
    logits_out = next(o for o in g.output if o.name == io["logits"])
    vocab_size = logits_out.type.tensor_type.shape.dim[2].dim_value
    if vocab_size <= 0:
        raise ValueError(f"output {io['logits']!r} must have a fixed vocabulary dimension")
    state_in = [io["h0"]] + ([io["c0"]] if io.get("c0") else [])
    state_out = [io["hn"]] + ([io["cn"]] if io.get("cn") else [])
    inits = {i.name for i in g.initializer}

    def rename(name: str) -> str:  # the model's own values live in the body under a prefix
        return name if not name or name in inits else _P + "m/" + name

    body_nodes = []
    for node in g.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _P + "m/" + node.name
        copy.input[:] = [rename(x) for x in node.input]
        copy.output[:] = [rename(x) for x in node.output]
        body_nodes.append(copy)
    carried = [rename(n) for n in (io["tokens"], *state_in)]
    tok_next, tok_scan = _P + "tok_next", _P + "tok_scan"
    body_nodes += _sampling_nodes(rename(io["logits"]), _P + "iter", _P + "tok_raw", vocab_size)
    body_nodes += [
        _const(_P + "zero_tok", 0, _I),
        helper.make_node("Max", [_P + "tok_raw", _P + "zero_tok"], [tok_next]),  # NaN rows feed 0
        helper.make_node("Identity", [_P + "tok_raw"], [tok_scan]),
        helper.make_node("Identity", [_P + "cond_in"], [_P + "cond_out"]),
    ]
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        body_nodes, "generation_step",
        [helper.make_tensor_value_info(_P + "iter", _I, []),
         helper.make_tensor_value_info(_P + "cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info(carried[0], _I, None),
         *[helper.make_tensor_value_info(c, f32, None) for c in carried[1:]]],
        [helper.make_tensor_value_info(_P + "cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(tok_next, _I, None),
         *[helper.make_tensor_value_info(rename(s), f32, None) for s in state_out],
         helper.make_tensor_value_info(tok_scan, _I, None)],
        # The weights live in the body: as its own constants onnxruntime pre-packs them once
        # (as outer-scope values they are re-read every iteration: the Loop ran at 0.67x).
        initializer=list(g.initializer),
    )
    outer_in = [io["tokens"], *state_in]
    nodes = [
        *_row_nodes(vocab_size),
        helper.make_node("Shape", ["u"], [_P + "ushape"]),
        _const(_P + "one", 1, _I),
        helper.make_node("Gather", [_P + "ushape", _P + "one"], [_P + "K"], axis=0),
        helper.make_node("Loop", [_P + "K", "", *outer_in],
                         [_P + "tok_final", *state_out, _P + "scan"], body=body),
        _const(_P + "ax2", [2], _I),
        helper.make_node("Squeeze", [_P + "scan", _P + "ax2"], [_P + "scan2"]),  # [K, B]
        helper.make_node("Transpose", [_P + "scan2"], [OUTPUT_TOKENS], perm=[1, 0]),
    ]
    inputs_by_name = {i.name: i for i in g.input}
    outputs_by_name = {o.name: o for o in g.output}
    graph = helper.make_graph(
        nodes, "generation",
        [inputs_by_name[n] for n in outer_in] + [
            helper.make_tensor_value_info("u", _D, ["batch", "k"]),
            helper.make_tensor_value_info("temperature", _D, ["batch"]),
            helper.make_tensor_value_info("top_k", _I, ["batch"]),
            helper.make_tensor_value_info("top_p", _D, ["batch"])],
        [helper.make_tensor_value_info(OUTPUT_TOKENS, _I, ["batch", "k"]),
         *[outputs_by_name[n] for n in state_out]],
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="nextchar-kstep")
    out.ir_version = model.ir_version
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    return out
