"""Open Inference Protocol tensors <-> numpy: typed contents or raw little-endian bytes, both ways."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

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


def declared(request: kpb.ModelInferRequest, accepted: Mapping[str, tuple[str, ...]],
             ) -> dict[str, tuple[int, ...]]:
    """The request's inputs' declared shapes by name, checked without reading any contents: at most one
    tensor per name of `accepted` (name -> the data types it may have), each of one of its types, with
    at most MAX_DIMS non-negative dimensions and its contents in one form.

    A request of a few MB can declare a million tiny tensors or elements: everything here costs time in
    the number of tensors a model has, so the face can refuse such a request before anything is decoded.
    """
    tensors, raw = request.inputs, request.raw_input_contents
    if len(tensors) > len(accepted):
        raise InvalidParameterError("inputs", f"must have at most {len(accepted)} tensors (one per input of "
                                    f"model {request.model_name!r}: {', '.join(accepted)}), got "
                                    f"{len(tensors)}")
    if raw and len(raw) != len(tensors):
        raise InvalidParameterError("raw_input_contents", f"must have one entry per input "
                                    f"({len(tensors)}), got {len(raw)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for i, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        if not name or name in shapes:
            raise InvalidParameterError(f"inputs[{i}].name", f"must be non-empty and unique, got {name!r}")
        if name not in accepted:
            raise InvalidParameterError(name, f"is not an input of model {request.model_name!r}; use "
                                        f"{', '.join(accepted)}")
        if datatype not in accepted[name]:
            raise InvalidParameterError(name, f"datatype must be one of {', '.join(accepted[name])}, got "
                                        f"{datatype!r}")
        if len(tensor.shape) > MAX_DIMS:  # numpy refuses more than 64, as an error the table calls a bug
            raise InvalidParameterError(name, f"shape must have at most {MAX_DIMS} dimensions, got "
                                        f"{len(tensor.shape)}")
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidParameterError(name, f"shape must have no negative dimension, got {list(shape)}")
        if raw and tensor.HasField("contents"):
            raise InvalidParameterError(name, "has both contents and raw_input_contents; send one")
        shapes[name] = shape
    return shapes


def decode_inputs(request: kpb.ModelInferRequest, shapes: Mapping[str, tuple[int, ...]],
                  ) -> dict[str, np.ndarray]:
    """The request's inputs by name, shaped; BYTES tensors are object arrays of `bytes`. `shapes` is
    what `declared` returned: callers check the declared shapes against their bounds before this.

    InvalidParameterError names the input whose element count or contents are wrong.
    """
    raw = request.raw_input_contents
    return {tensor.name: _decode(tensor, shapes[tensor.name], raw[i] if raw else None)
            for i, tensor in enumerate(request.inputs)}


def _decode(tensor: kpb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], raw: bytes | None,
            ) -> np.ndarray:
    """Contents of a tensor `declared` accepted; never more elements read than its shape holds."""
    name, datatype = tensor.name, tensor.datatype
    count = math.prod(shape)
    if raw is None:  # typed contents: the count is known before anything is converted
        values = getattr(tensor.contents, _CONTENTS[datatype])
        if len(values) != count:
            raise InvalidParameterError(name, f"shape {list(shape)} needs {count} elements, got "
                                        f"{len(values)}")
        if datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = list(values)
        else:
            array = np.asarray(values, dtype=NUMPY[datatype])
    elif datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = _split_bytes(raw, name, shape)
    else:
        dtype = NUMPY[datatype]
        if len(raw) != count * dtype.itemsize:
            raise InvalidParameterError(name, f"raw contents must be {count * dtype.itemsize} bytes for "
                                        f"shape {list(shape)} of {datatype}, got {len(raw)}")
        array = np.frombuffer(raw, dtype=dtype)
    return array.reshape(shape)


def _split_bytes(raw: bytes, name: str, shape: tuple[int, ...]) -> list[bytes]:
    count = math.prod(shape)
    values: list[bytes] = []
    at = 0
    while at < len(raw):
        if len(values) == count:  # stop at once: the rest may be a million more elements
            raise InvalidParameterError(name, f"raw BYTES contents hold more than the {count} elements of "
                                        f"shape {list(shape)}")
        if at + _LENGTH.size > len(raw):
            raise InvalidParameterError(name, "raw BYTES contents end inside a 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, at)
        at += _LENGTH.size
        if at + length > len(raw):
            raise InvalidParameterError(name, f"raw BYTES element of {length} bytes runs past the end")
        values.append(bytes(raw[at:at + length]))
        at += length
    if len(values) != count:
        raise InvalidParameterError(name, f"shape {list(shape)} needs {count} elements, got {len(values)}")
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
