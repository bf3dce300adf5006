"""The int8 variant: onnxruntime dynamic quantization of an exported model, measured against fp32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from nextchar.training.onnx_checks import session
from nextchar.v1 import manifest_pb2


def quantize_int8(
    fp32_path: Path, int8_path: Path, io: manifest_pb2.IoNames, state_shape: tuple[int, int],
    tokens: np.ndarray,
) -> manifest_pb2.Int8Variant:
    """Write a dynamically quantized copy of `fp32_path` and measure it on `tokens: int64[B, T]`.

    `state_shape` is (num_layers, hidden_size). Only weights that are graph initializers get
    quantized (the LSTM's become DynamicQuantizeLSTM, the head's MatMul becomes MatMulInteger;
    onnxruntime has no quantized GRU/RNN), so the node types actually introduced are recorded
    rather than assumed. sha256 and size are left to the caller, which writes the final file.
    """
    # quantize_dynamic logs a "consider pre-processing" warning on the root logger for every call;
    # shape pre-processing changes nothing for these graphs, so keep the export output clean.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)

    fp32_ops = {n.op_type for n in onnx.load(str(fp32_path)).graph.node}
    int8_ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}

    feeds = _zero_state_feeds(io, state_shape, tokens)
    ref = session(fp32_path).run([io.logits], feeds)[0]
    got = session(int8_path).run([io.logits], feeds)[0]
    return manifest_pb2.Int8Variant(
        argmax_agreement=float(np.mean(ref.argmax(-1) == got.argmax(-1))),
        max_abs_logit_diff=float(np.max(np.abs(ref - got))),
        quantized_op_types=sorted(op for op in int8_ops - fp32_ops if _is_quantized_op(op)),
    )


def _is_quantized_op(op_type: str) -> bool:
    """Integer-arithmetic node types (not the Cast/Mul glue quantization also inserts)."""
    return "Quantize" in op_type or op_type.endswith("Integer") or op_type.startswith(("QLinear", "QGemm"))


def _zero_state_feeds(io: manifest_pb2.IoNames, state_shape: tuple[int, int], tokens: np.ndarray) -> dict:
    layers, hidden = state_shape
    zeros = np.zeros((layers, tokens.shape[0], hidden), dtype=np.float32)
    feeds = {io.tokens: tokens.astype(np.int64), io.h0: zeros}
    if io.c0:
        feeds[io.c0] = zeros
    return feeds
