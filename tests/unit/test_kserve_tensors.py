"""Open Inference Protocol tensors: typed contents and raw bytes decode alike; bad ones name the input."""

from __future__ import annotations

import numpy as np
import pytest

from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.server.core.sampling import InvalidParameterError
from nextchar.server.edge.tensors import DATATYPES, declared, decode_inputs, encode_output

Tensor = kpb.ModelInferRequest.InferInputTensor
ANY = {name: DATATYPES for name in ("tokens", "text", "h0", "s", "x")}


def test_typed_and_raw_contents_decode_to_the_same_arrays() -> None:
    tokens = np.arange(6, dtype=np.int64).reshape(2, 3)
    text = np.array([b"O say", "ü".encode()], dtype=object)
    typed = kpb.ModelInferRequest(inputs=[
        Tensor(name="tokens", datatype="INT64", shape=[2, 3],
               contents=kpb.InferTensorContents(int64_contents=tokens.ravel().tolist())),
        Tensor(name="text", datatype="BYTES", shape=[2],
               contents=kpb.InferTensorContents(bytes_contents=text.tolist())),
    ])
    raw = kpb.ModelInferRequest(inputs=[Tensor(name="tokens", datatype="INT64", shape=[2, 3]),
                                        Tensor(name="text", datatype="BYTES", shape=[2])])
    raw.raw_input_contents.extend([encode_output("tokens", tokens, "INT64")[1],
                                   encode_output("text", text, "BYTES")[1]])
    for request in (typed, raw):
        got = decode_inputs(request, declared(request, ANY))
        assert got["tokens"].dtype == np.int64 and np.array_equal(got["tokens"], tokens)
        assert got["text"].tolist() == text.tolist()


@pytest.mark.parametrize(("tensor", "raw", "says"), [
    (Tensor(name="h0", datatype="FP32", shape=[2, 2]), b"\0" * 12, "must be 16 bytes"),
    (Tensor(name="h0", datatype="FP16", shape=[1]), b"\0\0", "datatype must be one of"),
    (Tensor(name="h0", datatype="FP32", shape=[-1]), b"", "no negative dimension"),
    (Tensor(name="s", datatype="BYTES", shape=[1]), b"\5\0\0\0abc", "runs past the end"),
    (Tensor(name="s", datatype="BYTES", shape=[2]), b"\1\0\0\0a", "needs 2 elements, got 1"),
    (Tensor(name="s", datatype="BYTES", shape=[1]), b"\1\0\0\0a" * 3, "hold more than the 1 elements"),
])
def test_a_bad_tensor_is_refused_naming_it(tensor, raw: bytes, says: str) -> None:
    request = kpb.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw])
    with pytest.raises(InvalidParameterError, match=says) as refused:
        decode_inputs(request, declared(request, ANY))
    assert refused.value.field == tensor.name


def test_contents_and_raw_together_or_duplicate_names_are_refused() -> None:
    both = kpb.ModelInferRequest(inputs=[Tensor(name="x", datatype="INT32", shape=[1],
                                                contents=kpb.InferTensorContents(int_contents=[1]))],
                                 raw_input_contents=[b"\1\0\0\0"])
    with pytest.raises(InvalidParameterError, match="both contents and raw"):
        declared(both, ANY)
    twice = kpb.ModelInferRequest(inputs=[Tensor(name="x", datatype="BOOL", shape=[0])] * 2)
    with pytest.raises(InvalidParameterError, match="unique") as refused:
        declared(twice, ANY)
    assert refused.value.field == "inputs[1].name"


def test_more_inputs_than_names_are_refused_before_any_is_read() -> None:
    tensors = [Tensor(name=f"i{i}", datatype="BOOL", shape=[1]) for i in range(len(ANY) + 1)]
    with pytest.raises(InvalidParameterError, match=f"at most {len(ANY)} tensors") as refused:
        declared(kpb.ModelInferRequest(model_name="m", inputs=tensors), ANY)
    assert refused.value.field == "inputs"
