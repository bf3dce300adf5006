"""Drive a nextchar server with tritonclient[grpc]; run by the tritonclient venv's python, not pytest.

Usage: triton_client.py ADDRESS WORKDIR. WORKDIR/spec.json says what to do; the answers go to
WORKDIR/report.json and the step face's outputs to WORKDIR/step_out.npz (inputs: WORKDIR/step_in.npz).
"""

from __future__ import annotations

import json
import queue
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 30.0


def descriptors(names: list[str]) -> dict:
    """Field (name, number, type, repeated?) of each message, as this tritonclient defines them."""
    out = {}
    for name in names:
        message = service_pb2.DESCRIPTOR.message_types_by_name[name]
        todo = [message]
        while todo:
            m = todo.pop()
            out[m.full_name] = [[f.name, f.number, f.type, f.label == f.LABEL_REPEATED] for f in m.fields]
            todo.extend(m.nested_types)
    return out


def text_inputs(prompt: str, max_tokens: int, **options) -> list[tc.InferInput]:
    """The Triton LLM-backend convention: one element per input, named as TensorRT-LLM names them."""
    specs = {"text_input": ("BYTES", np.array([prompt.encode()], dtype=object)),
             "max_tokens": ("INT32", np.array([max_tokens], dtype=np.int32))}
    kinds = {"temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
             "random_seed": ("UINT64", np.uint64), "stream": ("BOOL", np.bool_)}
    for name, value in options.items():
        if name == "stop_words":
            specs[name] = ("BYTES", np.array([s.encode() for s in value], dtype=object))
        else:
            datatype, dtype = kinds[name]
            specs[name] = (datatype, np.array([value], dtype=dtype))
    inputs = []
    for name, (datatype, array) in specs.items():
        tensor = tc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def stream(client: tc.InferenceServerClient, model: str, inputs: list[tc.InferInput],
           cancel_after: int | None = None) -> dict:
    """One streamed request: its chunks, final flags and last parameters, or its error."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(model, inputs, request_id="r1")
    chunks, finals, params, error = [], [], {}, None
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        result, err = got.get(timeout=max(0.1, deadline - time.monotonic()))
        if err is not None:
            error = str(err)
            break
        response = result.get_response()
        chunks.append(result.as_numpy("text_output")[0].decode())
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
        finals.append(params["triton_final_response"])
        assert response.id == "r1", response.id
        if params["triton_final_response"]:
            break
        if cancel_after is not None and len(chunks) >= cancel_after:
            break
    client.stop_stream(cancel_requests=cancel_after is not None)
    return {"chunks": chunks, "finals": finals, "params": params, "error": error}


def main(address: str, workdir: Path) -> None:
    spec = json.loads((workdir / "spec.json").read_text())
    client = tc.InferenceServerClient(address)
    model = spec["model"]
    report: dict = {
        "descriptors": descriptors(spec["messages"]),
        "live": client.is_server_live(client_timeout=TIMEOUT_S),
        "ready": client.is_server_ready(client_timeout=TIMEOUT_S),
        "model_ready": client.is_model_ready(model, client_timeout=TIMEOUT_S),
        "step_ready": client.is_model_ready(model + ".step", client_timeout=TIMEOUT_S),
        "server": client.get_server_metadata(as_json=True, client_timeout=TIMEOUT_S),
        "metadata": client.get_model_metadata(model, as_json=True, client_timeout=TIMEOUT_S),
        "step_metadata": client.get_model_metadata(model + ".step", as_json=True, client_timeout=TIMEOUT_S),
    }
    # The raw step: tokens and state in, logits and the next state out (raw little-endian tensors).
    arrays = dict(np.load(workdir / "step_in.npz"))
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model + ".step", inputs, client_timeout=TIMEOUT_S)
    np.savez(workdir / "step_out.npz", **{o["name"]: result.as_numpy(o["name"])
                                           for o in result.get_response(as_json=True)["outputs"]})
    # Generation: streamed (one response per chunk), unary, and the errors of a bad request.
    g = spec["generate"]
    report["streamed"] = stream(client, model, text_inputs(g["prompt"], g["max_tokens"], stream=True,
                                                          **g["options"]))
    unary = client.infer(model, text_inputs(g["prompt"], g["max_tokens"], **g["options"]),
                         client_timeout=TIMEOUT_S)
    report["unary"] = unary.as_numpy("text_output")[0].decode()
    report["bad_stream"] = stream(client, model, text_inputs(g["prompt"], 0, stream=True))
    try:
        client.infer(model, text_inputs(g["prompt"], 0), client_timeout=TIMEOUT_S)
        report["bad_unary"] = None
    except InferenceServerException as e:
        report["bad_unary"] = {"status": e.status(), "message": e.message()}
    c = spec["cancel"]
    report["cancelled"] = stream(client, model, text_inputs(g["prompt"], c["max_tokens"], stream=True,
                                                           temperature=1.0, random_seed=1),
                                 cancel_after=c["after_chunks"])
    (workdir / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
