"""Bad input over gRPC: the status code, and a message naming the field and its allowed range."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from nextchar.client.client import NextCharClient, generate_request
from nextchar.client.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from nextchar.v1 import inference_pb2_grpc

# The module's server (conftest.server) runs with max_prompt_chars=2000 and max_new_chars=5000.
MAX_PROMPT, MAX_NEW = 2000, 5000


@pytest.fixture(scope="module")
def client(server):
    with NextCharClient(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def vocab_size(client: NextCharClient) -> int:
    return len(client.get_model("lstm").manifest.vocab)


def _gen(**overrides):
    args = {"model": "lstm", "prompt": "O say", "max_new_chars": 10, **overrides}
    return generate_request(**args)


@pytest.mark.parametrize(("overrides", "field", "wanted"), [
    ({"prompt": ""}, "prompt", f"1 to {MAX_PROMPT} characters, got 0"),
    ({"prompt": "a" * (MAX_PROMPT + 1)}, "prompt", f"1 to {MAX_PROMPT} characters, got {MAX_PROMPT + 1}"),
    ({"max_new_chars": 0}, "max_new_chars", f"[1, {MAX_NEW}], got 0"),
    ({"max_new_chars": MAX_NEW + 1}, "max_new_chars", f"[1, {MAX_NEW}], got {MAX_NEW + 1}"),
    ({"temperature": -0.5}, "temperature", "[0, 100]"),
    ({"temperature": float("nan")}, "temperature", "[0, 100]"),
    ({"temperature": float("inf")}, "temperature", "[0, 100]"),
    ({"top_k": -1}, "top_k", "got -1"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_p": -0.1}, "top_p", "(0, 1]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 sequences, got 5"),
    ({"stop": ["a", ""]}, "stop[1]", "1 to 64 characters, got ''"),
    ({"model": ""}, "model.name", "is required"),
    ({"model": "../etc"}, "model.name", "invalid"),
    ({"version": -2}, "model.version", ">= 1"),
    ({"oov_policy": "replace", "prompt": "O sé", "oov_replacement": "é"}, "oov_replacement",
     "not in the model's vocabulary"),
    ({"oov_policy": "replace", "prompt": "O sé"}, "oov_replacement", "exactly one character"),
    ({"oov_replacement": "x"}, "oov_replacement", "only allowed with the replace policy"),
])
@pytest.mark.parametrize("rpc", ["generate", "generate_stream"])
def test_bad_generate_requests(client: NextCharClient, rpc: str, overrides: dict, field: str,
                               wanted: str) -> None:
    request = _gen(**overrides)
    name, prompt, n = request.model.name, request.prompt, request.max_new_chars
    kwargs = {k: v for k, v in overrides.items() if k not in ("model", "prompt", "max_new_chars")}
    with pytest.raises(InvalidArgument) as e:
        if rpc == "generate":
            client.generate(name, prompt, n, **kwargs)
        else:
            list(client.generate_stream(name, prompt, n, **kwargs))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith(f"{field}: "), e.value.details
    assert wanted in e.value.details, e.value.details
    assert [v.field for v in e.value.field_violations] == [field]


def test_top_k_above_the_vocabulary(client: NextCharClient, vocab_size: int) -> None:
    wanted = rf"top_k: must be in \[0, {vocab_size}\].*got {vocab_size + 1}"
    with pytest.raises(InvalidArgument, match=wanted):
        client.generate("lstm", "O say", 10, top_k=vocab_size + 1)
    assert len(client.generate("lstm", "O say", 10, top_k=vocab_size, temperature=1.0).text) == 10


def test_out_of_vocabulary_chars_are_named_with_positions_in_bad_request_details(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(_gen(prompt="O sé, #ay"), timeout=10)
    err = e.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'é' at 3" in err.details() and "'#' at 6" in err.details()
    [raw] = [v for k, v in err.trailing_metadata() if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("prompt", "character 'é' at position 3 is not in the vocabulary"),
        ("prompt", "character '#' at position 6 is not in the vocabulary"),
    ]


def test_oov_in_predict_and_score_name_their_field(client: NextCharClient) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.predict_next("gru", "O sé", 3)
    assert e.value.field_violations[0].field == "context" and "'é'" in e.value.field_violations[0].description
    with pytest.raises(InvalidArgument) as e:
        client.score("gru", "O s€y")
    [violation] = e.value.field_violations
    assert violation.field == "text" and "position 3" in violation.description


def test_unknown_model_and_version_are_not_found(client: NextCharClient) -> None:
    with pytest.raises(NotFound, match=r"model.name: no model named 'anthem' \(available: gru, lstm, rnn\)"):
        client.generate("anthem", "O say", 10)
    with pytest.raises(NotFound, match=r"model.version: model 'lstm' has no version 9 \(available: 1\)"):
        client.predict_next("lstm", "O say", 3, version=9)
    with pytest.raises(NotFound):
        client.score("nope", "O say")
    with pytest.raises(NotFound):
        list(client.generate_stream("nope", "O say", 10))


def test_predict_n_out_of_range(client: NextCharClient, vocab_size: int) -> None:
    for n in (0, -1, vocab_size + 1):
        wanted = rf"^INVALID_ARGUMENT: n: must be in \[1, {vocab_size}\].*got {n}"
        with pytest.raises(InvalidArgument, match=wanted):
            client.predict_next("lstm", "O say", n)
    with pytest.raises(InvalidArgument, match=r"context: must have 1 to 2000 characters, got 0"):
        client.predict_next("lstm", "", 3)
    with pytest.raises(InvalidArgument, match=r"temperature: must be in \(0, 100\]"):
        client.predict_next("lstm", "O say", 3, temperature=0.0)


def test_score_of_empty_or_too_short_text(client: NextCharClient) -> None:
    with pytest.raises(InvalidArgument, match=r"text: must have at least two characters when no context"):
        client.score("lstm", "")
    with pytest.raises(InvalidArgument, match=r"text: must have at least one character"):
        client.score("lstm", "", context="O say")
    with pytest.raises(InvalidArgument, match=r"text: must have at least two characters when no context"):
        client.score("lstm", "O")
    with pytest.raises(InvalidArgument, match=r"text: context \+ text must have at most 2000 characters"):
        client.score("lstm", "a" * 1500, context="b" * 1500)
    assert client.score("lstm", "y", context="O sa").scored_chars == 1


def test_too_many_calls_in_flight_is_resource_exhausted(make_server) -> None:
    s = make_server(max_concurrent=1, max_new_chars=100_000)
    with NextCharClient(s.address, timeout=30) as c:
        long = c.generate_stream("rnn", "O say", 100_000, temperature=1.0)
        first = next(iter(long))  # the stream now holds the only slot
        assert first
        with pytest.raises(ResourceExhausted, match=r"max_concurrent=1"):
            c.generate("rnn", "O say", 5)
        long.cancel()


def test_a_message_over_the_size_limit_is_resource_exhausted(make_server) -> None:
    s = make_server(max_message_bytes=4096, max_prompt_chars=100_000)
    with NextCharClient(s.address, timeout=30) as c:
        with pytest.raises(ResourceExhausted):
            c.generate("lstm", "O say " * 2000, 5)
        assert c.generate("lstm", "O say", 5).summary.generated_chars == 5


def test_a_damaged_older_version_is_failed_precondition(make_server, model_repo, trained_models,
                                                        tmp_path) -> None:
    """The latest versions load at start; a damaged older one fails only when a request names it."""
    import json
    import shutil

    from nextchar.training.export import export_model

    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    model, vocab, training = trained_models["rnn"]
    export_model(model, vocab, repo, "rnn", version=2, training=training)
    manifest = repo / "rnn" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["model_sha256"] = "f" * 64
    manifest.write_text(json.dumps(data))
    s = make_server(repo)
    with NextCharClient(s.address) as c:
        assert c.generate("rnn", "O say", 5).summary.version == 2
        wanted = r"rnn/1/model.onnx: sha256 is .* \(corrupt or replaced\)"
        with pytest.raises(FailedPrecondition, match=wanted):
            c.generate("rnn", "O say", 5, version=1)
