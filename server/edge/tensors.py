"""Open Inference Protocol tensors <-> numpy: typed contents or raw little-endian bytes, both ways."""

from __future__ import annotations

import math
import struct

import numpy as np

from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.server.core.sampling import InvalidParameterError

# The protocol's data types (FP16 and BF16 travel only as raw bytes; nextchar's models use neither).
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY, "BYTES")
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")  # BYTES elements in raw form: a 4-byte length, then the bytes

MAX_DIMS = 8  # every tensor of both faces has at most 3; a bound keeps errors and numpy simple


def decode_inputs(request: kpb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's inputs by name, shaped; BYTES tensors are object arrays of `bytes`.

    InvalidParameterError names the input whose type, shape or element count is wrong.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidParameterError("raw_input_contents", f"must have one entry per input "
                                    f"({len(request.inputs)}), got {len(raw)}")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name or name in out:
            raise InvalidParameterError(f"inputs[{i}].name", f"must be non-empty and unique, got {name!r}")
        out[name] = _decode(tensor, raw[i] if raw else None)
    return out


def _decode(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    if datatype not in DATATYPES:
        raise InvalidParameterError(name, f"datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}")
    if len(shape) > MAX_DIMS:  # numpy refuses more than 64, as an error the table would call a bug
        raise InvalidParameterError(name, f"shape must have at most {MAX_DIMS} dimensions, got {len(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidParameterError(name, f"shape must have no negative dimension, got {list(shape)}")
    count = math.prod(shape)
    if raw is not None and tensor.HasField("contents"):
        raise InvalidParameterError(name, "has both contents and raw_input_contents; send one")
    if datatype == "BYTES":
        values = _split_bytes(raw, name) if raw is not None else list(tensor.contents.bytes_contents)
        array = np.empty(len(values), dtype=object)
        array[:] = values
    elif raw is not None:
        dtype = NUMPY[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidParameterError(name, f"raw contents must be {count * dtype.itemsize} bytes for "
                                        f"shape {list(shape)} of {datatype}, got {len(raw)}")
        array = np.frombuffer(raw, dtype=dtype)
    else:
        array = np.asarray(getattr(tensor.contents, _CONTENTS[datatype]), dtype=NUMPY[datatype])
    if array.size != count:
        raise InvalidParameterError(name, f"shape {list(shape)} needs {count} elements, got {array.size}")
    return array.reshape(shape)


def _split_bytes(raw: bytes, name: str) -> list[bytes]:
    values, at = [], 0
    while at < len(raw):
        if at + _LENGTH.size > len(raw):
            raise InvalidParameterError(name, "raw BYTES contents end inside a 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, at)
        at += _LENGTH.size
        if at + length > len(raw):
            raise InvalidParameterError(name, f"raw BYTES element of {length} bytes runs past the end")
        values.append(bytes(raw[at:at + length]))
        at += length
    return values


def encode_output(name: str, array: np.ndarray, datatype: str,
                  ) -> tuple[kpb.ModelInferResponse.InferOutputTensor, bytes]:
    """One output as its tensor description and its raw bytes (the form Triton answers in)."""
    tensor = kpb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=array.shape)
    if datatype == "BYTES":
        raw = b"".join(_LENGTH.pack(len(v)) + v for v in array.reshape(-1))
    else:
        raw = np.ascontiguousarray(array, dtype=NUMPY[datatype]).tobytes()
    return tensor, raw
