"""The /metrics endpoint of a real server process: it parses, and counters move by exactly the calls made."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import grpc
import pytest
from ops_harness import ServerProcess, scrape, value
from server_harness import free_port, run_cli, wait_until

from nextchar.v1 import inference_pb2 as pb
from nextchar.v1.inference_pb2_grpc import NextCharStub


@pytest.fixture(scope="module")
def metered(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    log = tmp_path_factory.mktemp("metrics") / "server.log"
    server = ServerProcess(model_repo, "--metrics-port", str(port), "--log-format", "json", log_path=log)
    yield server, port
    server.close()


def _ref(name: str) -> pb.ModelRef:
    return pb.ModelRef(name=name)


def test_counters_move_by_exactly_the_calls_made(metered) -> None:
    server, port = metered
    before = scrape(port)
    stub = server.stub
    for seed in range(3):
        reply = stub.Generate(pb.GenerateRequest(model=_ref("lstm"), prompt="O say", max_new_chars=20,
                                                 temperature=1.0, seed=seed), timeout=30)
        assert reply.summary.usage.generated_chars == 20
    for seed in range(2):
        messages = list(stub.GenerateStream(pb.GenerateRequest(model=_ref("gru"), prompt="O say",
                                                               max_new_chars=30, temperature=1.0, seed=seed),
                                            timeout=30))
        assert messages[-1].summary.usage.generated_chars == 30
    stub.PredictNext(pb.PredictNextRequest(model=_ref("rnn"), context="O say", n=3), timeout=30)
    stub.Score(pb.ScoreRequest(model=_ref("rnn"), text="O say can you see"), timeout=30)
    with pytest.raises(grpc.RpcError) as missing:
        stub.Generate(pb.GenerateRequest(model=_ref("nope"), prompt="O", max_new_chars=5), timeout=30)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.Generate(pb.GenerateRequest(model=_ref("lstm"), prompt="O", max_new_chars=0), timeout=30)
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    expected = {
        ("Generate", "lstm", "OK"): 3, ("GenerateStream", "gru", "OK"): 2, ("PredictNext", "rnn", "OK"): 1,
        ("Score", "rnn", "OK"): 1, ("Generate", "", "NOT_FOUND"): 1,
        ("Generate", "lstm", "INVALID_ARGUMENT"): 1,
    }

    def requests(scraped: dict) -> float:
        return sum(v for (name, _), v in scraped.items() if name == "nextchar_requests_total")

    # The interceptor counts a call once its handler returned, which can be just after the client saw
    # the status: scrape until every call is counted (bounded), then check the counts exactly.
    def all_counted() -> dict | None:
        scraped = scrape(port)
        return scraped if requests(scraped) - requests(before) >= sum(expected.values()) else None

    after = wait_until(all_counted, 10, "every call to be counted")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for (method, model, code), n in expected.items():
        assert moved("nextchar_requests_total", method=method, model=model, code=code) == n, (method, code)
    # Nothing else was counted (health probes are not requests).
    assert requests(after) - requests(before) == sum(expected.values())

    assert moved("nextchar_generated_chars_total", model="lstm") == 60
    assert moved("nextchar_generated_chars_total", model="gru") == 60
    assert moved("nextchar_time_to_first_char_seconds_count", model="lstm") == 3
    assert moved("nextchar_time_to_first_char_seconds_count", model="gru") == 2
    assert moved("nextchar_request_duration_seconds_count", method="Generate") == 5
    # n chars take n engine steps (the prompt's prefill yields the first); PredictNext and Score one each.
    # One observation per engine call; a call advances a stream K chars (K ramps 1, 2, 4, ...).
    assert 3 * 2 <= moved("nextchar_engine_step_duration_seconds_count", model="lstm") < 3 * 20
    assert moved("nextchar_engine_step_duration_seconds_count", model="rnn") == 2
    calls = moved("nextchar_batch_size_count", model="gru")
    assert 2 * 2 <= calls < 2 * 30
    assert moved("nextchar_batch_size_bucket", model="gru", le="1.0") == calls  # one at a time: rows of 1
    for name in ("lstm", "gru", "rnn"):
        assert value(after, "nextchar_model_loads_total", model=name, result="success") == 1
        assert value(after, "nextchar_model_loaded", model=name, version=1) == 1
    assert value(after, "nextchar_active_streams") == 0
    assert ("nextchar_queue_depth", ()) in after and ("nextchar_calls_in_flight", ()) in after


def test_one_json_log_line_per_request_without_the_prompt(metered) -> None:
    server, _ = metered
    server.stub.Generate(pb.GenerateRequest(model=_ref("lstm"), prompt="O say secret", max_new_chars=7),
                         timeout=30, metadata=(("x-request-id", "trace-42"),))
    server.stub.ListModels(pb.ListModelsRequest(), timeout=30)  # a later line proves the first was flushed

    def lines() -> list[dict]:
        return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]

    wait_until(lambda: any(e.get("method") == "ListModels" for e in lines()), 10, "the ListModels log line")
    mine = [e for e in lines() if e.get("request_id") == "trace-42"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["method"] == "Generate" and entry["model"] == "lstm" and entry["version"] == 1
    assert entry["code"] == "OK" and entry["chars"] == 7 and entry["duration_ms"] > 0 and "ttfc_ms" in entry
    assert "prompt" not in entry and "secret" not in server.log()


def test_a_busy_metrics_port_stops_start_up_naming_it(model_repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--model-repo", str(model_repo), "--host", "127.0.0.1", "--port",
                         str(free_port()), "--metrics-port", str(port))
    assert result.returncode == 1
    assert f"cannot bind the metrics endpoint 127.0.0.1:{port}" in result.stderr, result.stderr


def test_log_prompts_puts_the_user_text_in_the_request_line(make_server, caplog) -> None:
    """In-process, so the request log record itself can be read (its structured fields)."""
    server = make_server(log_prompts=True)
    with caplog.at_level(logging.INFO, logger="nextchar.requests"):
        with grpc.insecure_channel(server.address) as channel:
            request = pb.ScoreRequest(model=_ref("gru"), text="O say can", context="And the")
            NextCharStub(channel).Score(request, timeout=30)
        wait_until(lambda: any(getattr(r, "fields", {}).get("method") == "Score" for r in caplog.records),
                   10, "the Score request line")
    line = next(r for r in caplog.records if getattr(r, "fields", {}).get("method") == "Score")
    assert line.fields["text"] == "O say can" and line.fields["context"] == "And the"
    assert 'text="O say can"' in line.getMessage() and line.fields["model"] == "gru"
    # A prompt far past the limit is refused, and its log line stays bounded (it held all 1 MB).
    with caplog.at_level(logging.INFO, logger="nextchar.requests"):
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
            NextCharStub(channel).Generate(pb.GenerateRequest(model=_ref("gru"), prompt="O" * 1_000_000,
                                                              max_new_chars=5), timeout=30)
        wait_until(lambda: any(getattr(r, "fields", {}).get("method") == "Generate" for r in caplog.records),
                   10, "the Generate request line")
    line = next(r for r in caplog.records if getattr(r, "fields", {}).get("method") == "Generate")
    assert line.fields["code"] == "INVALID_ARGUMENT" and line.fields["prompt"].endswith("(1000000 chars)")
    assert len(line.getMessage()) < 12_000


def test_kserve_calls_are_observed_like_nextchars(metered) -> None:
    """Standard model-serving clients (KServe v2 / Triton gRPC) get the same request lines and counters:
    ModelInfer on the text face and on "<name>.step" (labelled with the model), ModelMetadata; the
    protocol's liveness probe is not a request."""
    from nextchar.inference import grpc_service_pb2 as kpb
    from nextchar.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub

    server, port = metered
    before = scrape(port)
    tensor = kpb.ModelInferRequest.InferInputTensor
    text = kpb.ModelInferRequest(model_name="lstm", id="k1", inputs=[
        tensor(name="text_input", datatype="BYTES", shape=[1],
               contents=kpb.InferTensorContents(bytes_contents=[b"O say"])),
        tensor(name="max_tokens", datatype="INT64", shape=[1],
               contents=kpb.InferTensorContents(int64_contents=[9]))])
    step = kpb.ModelInferRequest(model_name="rnn.step", inputs=[
        tensor(name="tokens", datatype="INT64", shape=[1, 2],
               contents=kpb.InferTensorContents(int64_contents=[1, 2]))])
    with grpc.insecure_channel(server.address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        stub.ModelInfer(text, timeout=30, metadata=(("x-request-id", "kserve-7"),))
        stub.ModelInfer(step, timeout=30)
        stub.ModelMetadata(kpb.ModelMetadataRequest(name="gru"), timeout=30)
        stub.ServerLive(kpb.ServerLiveRequest(), timeout=30)
    expected = {("ModelInfer", "lstm"): 1, ("ModelInfer", "rnn"): 1, ("ModelMetadata", "gru"): 1}

    def counted() -> dict | None:
        scraped = scrape(port)
        done = all(value(scraped, "nextchar_requests_total", method=m, model=n, code="OK")
                   - value(before, "nextchar_requests_total", method=m, model=n, code="OK") >= k
                   for (m, n), k in expected.items())
        return scraped if done else None

    after = wait_until(counted, 10, "the KServe calls to be counted")
    for (method, model), n in expected.items():
        assert value(after, "nextchar_requests_total", method=method, model=model, code="OK") \
            - value(before, "nextchar_requests_total", method=method, model=model, code="OK") == n
    assert not [k for k in after if k[0] == "nextchar_requests_total" and ("method", "ServerLive") in k[1]]
    assert value(after, "nextchar_generated_chars_total", model="lstm") \
        - value(before, "nextchar_generated_chars_total", model="lstm") == 9
    (line,) = [json.loads(x) for x in server.log().splitlines()
               if x.startswith("{") and json.loads(x).get("request_id") == "kserve-7"]
    assert line["method"] == "ModelInfer" and line["model"] == "lstm" and line["version"] == 1
    assert line["chars"] == 9 and line["code"] == "OK"
