"""The Open Inference Protocol (KServe v2 + Triton's ModelStreamInfer), driven by tritonclient[grpc].

tritonclient pins protobuf<7 and nextchar needs 7, so the client runs from its own cached venv as a
subprocess (triton_client.py) against a real server on 127.0.0.1, and reports back in JSON.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2
from server_harness import wait_until

from nextchar.client.client import NextCharClient
from nextchar.inference import grpc_service_pb2 as kpb
from nextchar.inference import grpc_service_pb2_grpc
from nextchar.server.core.generation import FinishReason

TRITONCLIENT = "tritonclient[grpc]==2.73.0"  # the revision grpc_service.proto names
MESSAGES = ["ServerLiveResponse", "ServerReadyResponse", "ModelReadyRequest", "ModelReadyResponse",
            "ServerMetadataResponse", "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter",
            "InferTensorContents", "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse"]
PROMPT = "O say can you see"
OPTIONS = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "random_seed": 7, "stop_words": ["ramparts"]}
CANCEL_MAX = 100_000
# The first run builds the tritonclient venv (pip: minutes on a loaded machine; each step is bounded).
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """A venv with tritonclient, built once and cached (delete the folder to rebuild it)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nextchar"
    venv = cache / f"tritonclient-{TRITONCLIENT.split('==')[1]}-venv"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        pip = subprocess.run([python, "-m", "pip", "install", "-q", TRITONCLIENT], capture_output=True,
                             text=True, timeout=600)
        if pip.returncode != 0:
            pytest.skip(f"cannot install {TRITONCLIENT} into {venv}: {pip.stderr[-600:]}")
        (venv / ".complete").touch()
    return python


@pytest.fixture(scope="module")
def served(make_server):
    # A high max_new_chars so the cancelled stream would run long if the cancel did not stop it.
    return make_server(max_prompt_chars=2000, max_new_chars=CANCEL_MAX)


@pytest.fixture(scope="module")
def step_inputs(served) -> dict[str, np.ndarray]:
    engine = served.server.servicer.registry.cached("lstm").engine
    rng = np.random.default_rng(3)
    state = (engine.num_layers, 2, engine.hidden_size)
    return {"tokens": rng.integers(0, engine.vocab_size, (2, 5)).astype(np.int64),
            "h0": rng.normal(0, 0.5, state).astype(np.float32),
            "c0": rng.normal(0, 0.5, state).astype(np.float32)}


@pytest.fixture(scope="module")
def report(triton_python: Path, served, step_inputs, tmp_path_factory) -> dict:
    """Everything tritonclient saw, from one client run (its import alone takes a second or two)."""
    work = tmp_path_factory.mktemp("triton")
    spec = {"model": "lstm", "messages": MESSAGES, "cancel": {"max_tokens": CANCEL_MAX, "after_chunks": 2},
            "generate": {"prompt": PROMPT, "max_tokens": 300, "options": OPTIONS}}
    (work / "spec.json").write_text(json.dumps(spec))
    np.savez(work / "step_in.npz", **step_inputs)
    script = Path(__file__).with_name("triton_client.py")
    run = subprocess.run([triton_python, script, served.address, work], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((work / "report.json").read_text())
    result["step_out"] = dict(np.load(work / "step_out.npz"))
    return result


def test_messages_match_the_ones_tritonclient_ships(report) -> None:
    ours = {}
    for name in MESSAGES:
        todo = [kpb.DESCRIPTOR.message_types_by_name[name]]
        while todo:
            m = todo.pop()
            ours[m.full_name] = [[f.name, f.number, f.type, f.is_repeated] for f in m.fields]
            todo.extend(m.nested_types)
    assert ours == report["descriptors"]


def test_live_ready_and_metadata(report) -> None:
    assert report["live"] and report["ready"] and report["model_ready"] and report["step_ready"]
    assert report["server"]["name"] == "nextchar"
    meta = report["metadata"]
    assert meta["name"] == "lstm" and meta["versions"] == ["1"]
    inputs = {t["name"]: t["datatype"] for t in meta["inputs"]}
    assert inputs["text_input"] == "BYTES" and inputs["max_tokens"] == "INT32" and inputs["stream"] == "BOOL"
    assert [t["name"] for t in meta["outputs"]] == ["text_output"]
    step = report["step_metadata"]
    assert [(t["name"], t["datatype"]) for t in step["inputs"]] == [("tokens", "INT64"), ("h0", "FP32"),
                                                                    ("c0", "FP32")]
    assert [t["name"] for t in step["outputs"]] == ["logits", "hn", "cn"]


def test_readiness_agrees_with_grpc_health(served) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(kpb.ModelReadyRequest(name="gru"), timeout=10).ready
        served.run(served.server.health.set("gru", health_pb2.HealthCheckResponse.NOT_SERVING))
        try:
            assert not stub.ModelReady(kpb.ModelReadyRequest(name="gru"), timeout=10).ready
            assert not stub.ModelReady(kpb.ModelReadyRequest(name="gru.step"), timeout=10).ready
            assert stub.ModelReady(kpb.ModelReadyRequest(name="lstm"), timeout=10).ready
        finally:
            served.run(served.server.health.set("gru", health_pb2.HealthCheckResponse.SERVING))
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelReady(kpb.ModelReadyRequest(name="nope"), timeout=10)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND and "model_name" in missing.value.details()


def test_step_face_equals_onnxruntime(report, model_repo: Path, step_inputs) -> None:
    session = ort.InferenceSession(str(model_repo / "lstm" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, step_inputs), strict=True))
    got = report["step_out"]
    assert sorted(got) == sorted(expected) == ["cn", "hn", "logits"]
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


def test_streamed_generation_equals_nextchar_v1(report, served) -> None:
    with NextCharClient(served.address, timeout=60) as client:
        v1 = client.generate("lstm", PROMPT, 300, temperature=OPTIONS["temperature"], top_k=OPTIONS["top_k"],
                             top_p=OPTIONS["top_p"], seed=OPTIONS["random_seed"], stop=OPTIONS["stop_words"])
    streamed = report["streamed"]
    assert streamed["error"] is None
    assert len(streamed["chunks"]) >= 3, "expected one response per chunk, then the final one"
    assert streamed["finals"] == [False] * (len(streamed["chunks"]) - 1) + [True]
    assert "".join(streamed["chunks"]) == v1.text == report["unary"]
    final = streamed["params"]
    assert final["finish_reason"] == v1.summary.finish_reason
    assert final["seed"] == OPTIONS["random_seed"] and final["generated_chars"] == v1.summary.generated_chars


def test_bad_request_gives_a_clear_error(report) -> None:
    stream_error = report["bad_stream"]["error"]
    assert stream_error.startswith("INVALID_ARGUMENT: max_tokens: must be in [1, "), stream_error
    unary = report["bad_unary"]
    assert unary["status"] == "StatusCode.INVALID_ARGUMENT", unary
    assert unary["message"].startswith("max_tokens: must be in [1, "), unary


def test_cancelled_stream_stops_generating(report, served) -> None:
    cancelled = report["cancelled"]
    assert cancelled["error"] is None and len(cancelled["chunks"]) == 2 and not any(cancelled["finals"])
    track = next(t for t in reversed(served.tracks) if t.max_new_chars == CANCEL_MAX)
    wait_until(lambda: track.finished_at is not None, 10, "the cancelled generation to stop")
    assert track.reason is FinishReason.CANCELLED and track.steps < CANCEL_MAX


def _text_request(request_id: str, max_tokens: int) -> kpb.ModelInferRequest:
    """Typed contents (tritonclient sends raw bytes, so this covers the other encoding)."""
    tensor = kpb.ModelInferRequest.InferInputTensor
    return kpb.ModelInferRequest(model_name="lstm", id=request_id, inputs=[
        tensor(name="text_input", datatype="BYTES", shape=[1],
               contents=kpb.InferTensorContents(bytes_contents=[PROMPT.encode()])),
        tensor(name="max_tokens", datatype="INT64", shape=[1],
               contents=kpb.InferTensorContents(int64_contents=[max_tokens])),
        tensor(name="stream", datatype="BOOL", shape=[1],
               contents=kpb.InferTensorContents(bool_contents=[True])),
    ])


def test_one_stream_runs_requests_concurrently_and_outlives_a_bad_one(served) -> None:
    requests = [_text_request("long", 5000), _text_request("bad", 0), _text_request("short", 3)]
    with grpc.insecure_channel(served.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    (error,) = [r for r in replies if r.error_message]
    assert error.infer_response.id == "bad"
    message = error.error_message
    assert message.startswith("INVALID_ARGUMENT: max_tokens: must be in [1, "), message
    finals = [r.infer_response.id for r in replies
              if not r.error_message and r.infer_response.parameters["triton_final_response"].bool_param]
    assert finals == ["short", "long"], "the short request must not wait for the long one"
    texts = {"long": "", "short": ""}
    for r in replies:
        if not r.error_message:
            (raw,) = r.infer_response.raw_output_contents
            texts[r.infer_response.id] += raw[4:].decode()  # one BYTES element: 4-byte length, then UTF-8
    assert len(texts["short"]) == 3 and len(texts["long"]) == 5000


def _refused(address: str, request: kpb.ModelInferRequest) -> grpc.RpcError:
    """The error a ModelInfer call ends with (it must fail)."""
    with grpc.insecure_channel(address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
    return refused.value


def test_a_prompt_outside_the_vocabulary_names_text_input(served) -> None:
    request = _text_request("oov", 5)
    request.inputs[0].contents.bytes_contents[0] = "O say ✓".encode()
    error = _refused(served.address, request)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("text_input: 1 character(s) not in the model's vocabulary")


def test_the_protocol_needs_the_token_like_every_call(make_server) -> None:
    server = make_server(auth_token="s3cret-token")
    with grpc.insecure_channel(server.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        unary = functools.partial(stub.ModelInfer, _text_request("a", 3), timeout=30)

        def stream(**kw):
            return list(stub.ModelStreamInfer(iter([_text_request("b", 3)]), timeout=30, **kw))

        for call in (unary, stream):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert call(metadata=(("authorization", "Bearer s3cret-token"),))


def test_a_version_that_only_looks_numeric_or_overflows_is_invalid_argument(served) -> None:
    """"²".isdigit() is True in Python but int() refuses it; 2^63 does not fit the version (int64); int()
    refuses a string of over 4,300 digits. Each is INVALID_ARGUMENT naming model_version (the last two
    were INTERNAL), on ModelInfer, ModelMetadata and ModelReady alike, with a bounded message."""
    expected = "model_version: must be an integer in [1, 9223372036854775807]"
    with grpc.insecure_channel(served.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for version in ("²", "0", str(2**63), "9" * 5000):
            request = _text_request("v", 3)
            request.model_version = version
            metadata = kpb.ModelMetadataRequest(name="lstm", version=version)
            calls = (functools.partial(stub.ModelInfer, request),
                     functools.partial(stub.ModelMetadata, metadata),
                     functools.partial(stub.ModelReady, kpb.ModelReadyRequest(name="lstm", version=version)))
            for call in calls:
                with pytest.raises(grpc.RpcError) as refused:
                    call(timeout=30)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (version[:20], call)
                assert refused.value.details().startswith(expected), refused.value.details()
                assert len(refused.value.details()) < 200


def test_kserve_inputs_are_checked_as_nextchar_v1_checks_them(served, step_inputs) -> None:
    """A request id over 256 chars (echoed in every response of a stream) is refused; max_tokens and
    top_k past int32 name the same ranges as nextchar.v1 (they named int32's); a state with NaN is
    refused on the step face (it answered NaN logits with OK)."""
    long_id = _refused(served.address, _text_request("x" * 257, 3))
    assert long_id.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert long_id.details() == "id: must be at most 256 characters, got 257"
    tensor = kpb.ModelInferRequest.InferInputTensor
    for name, value, expected in (("max_tokens", 2**40, f"max_tokens: must be in [1, {CANCEL_MAX}], got "),
                                  ("top_k", 2**40, "top_k: must be in [0, ")):
        request = _text_request("r", 3)
        request.inputs.append(tensor(name=name, datatype="INT64", shape=[1],
                                     contents=kpb.InferTensorContents(int64_contents=[value])))
        if name == "max_tokens":
            del request.inputs[1]
        error = _refused(served.address, request)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(expected), error.details()
    h0 = step_inputs["h0"].copy()
    h0[0, 0, 0] = np.nan
    step = kpb.ModelInferRequest(model_name="lstm.step", inputs=[
        tensor(name="tokens", datatype="INT64", shape=list(step_inputs["tokens"].shape),
               contents=kpb.InferTensorContents(int64_contents=step_inputs["tokens"].ravel().tolist())),
        tensor(name="h0", datatype="FP32", shape=list(h0.shape),
               contents=kpb.InferTensorContents(fp32_contents=h0.ravel().tolist()))])
    error = _refused(served.address, step)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("h0: must hold finite numbers"), error.details()
