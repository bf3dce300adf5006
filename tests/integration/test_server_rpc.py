"""Every NextChar RPC through the typed client against a real server over lstm, gru and rnn."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.client.client import AsyncNextCharClient, NextCharClient
from nextchar.client.errors import NotFound

MODELS = ("lstm", "gru", "rnn")


@pytest.fixture(scope="module")
def versioned_repo(model_repo: Path, trained_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_repo plus lstm/2, which is really the GRU's weights, so the versions are told apart by cell."""
    from nextchar.training.export import export_model

    repo = tmp_path_factory.mktemp("versioned") / "repo"
    shutil.copytree(model_repo, repo)
    model, vocab, training = trained_models["gru"]
    export_model(model, vocab, repo, "lstm", version=2, training=training)
    return repo


@pytest.fixture(scope="module")
def vserver(make_server, versioned_repo: Path):
    return make_server(versioned_repo)


@pytest.fixture(scope="module")
def client(server):
    with NextCharClient(server.address, timeout=30) as c:
        yield c


def test_list_models_describes_every_model(client: NextCharClient, model_repo: Path) -> None:
    models = client.list_models()
    assert [m.name for m in models] == sorted(MODELS)
    for m in models:
        assert m.version == 1 and m.available_versions == (1,)
        assert m.cell == m.name  # the fixture names each model after its cell
        on_disk = json.loads((model_repo / m.name / "1" / "manifest.json").read_text())
        assert list(m.manifest.vocab) == on_disk["vocab"]
        assert m.manifest.architecture.hidden_size == 48 and m.manifest.architecture.num_layers == 2
        assert m.manifest.model_sha256 == on_disk["model_sha256"]
        assert m.manifest.training.corpus_name == "anthem" and m.manifest.training.steps > 0


def test_get_model_returns_the_manifest(client: NextCharClient) -> None:
    info = client.get_model("gru")
    assert info.name == "gru" and info.version == 1 and info.cell == "gru"
    assert info.manifest.architecture.vocab_size == len(info.manifest.vocab)
    assert client.get_model("gru", 1).manifest == info.manifest


def test_versions_are_addressable_and_latest_is_the_default(vserver) -> None:
    with NextCharClient(vserver.address) as c:
        [lstm] = [m for m in c.list_models() if m.name == "lstm"]
        assert lstm.version == 2 and lstm.available_versions == (1, 2)
        assert c.get_model("lstm").cell == "gru"          # v2 (latest) holds the GRU weights
        assert c.get_model("lstm", 1).cell == "lstm"      # v1 loads on demand
        g1 = c.generate("lstm", "O say", 40, version=1, temperature=0.0)
        g2 = c.generate("lstm", "O say", 40, temperature=0.0)
        assert (g1.summary.version, g2.summary.version) == (1, 2)
        # same weights, same greedy text
        assert g2.text == c.generate("gru", "O say", 40, temperature=0.0).text
        with pytest.raises(NotFound, match="no version 3"):
            c.get_model("lstm", 3)


def test_a_version_exported_after_start_is_found(make_server, versioned_repo: Path, tmp_path: Path,
                                                  trained_models: dict) -> None:
    from nextchar.training.export import export_model

    repo = tmp_path / "repo"
    shutil.copytree(versioned_repo, repo)
    s = make_server(repo)
    model, vocab, training = trained_models["rnn"]
    export_model(model, vocab, repo, "rnn", version=5, training=training)
    with NextCharClient(s.address) as c:
        assert c.get_model("rnn", 5).version == 5
        assert c.get_model("rnn").version == 1  # "latest" is what was loaded at start


@pytest.mark.parametrize("name", MODELS)
def test_generate_unary_and_stream_agree(client: NextCharClient, name: str) -> None:
    unary = client.generate(name, "O say", 120, temperature=0.9, seed=7)
    stream = client.generate_stream(name, "O say", 120, temperature=0.9, seed=7)
    pieces = list(stream)
    assert "".join(pieces) == unary.text and len(unary.text) == 120
    untimed = {"time_to_first_char_ms": 0.0, "total_ms": 0.0}
    assert dataclasses.replace(stream.summary, **untimed) == dataclasses.replace(unary.summary, **untimed)
    s = unary.summary
    assert (s.finish_reason, s.prompt_chars, s.generated_chars, s.seed) == ("length", 5, 120, 7)
    assert (s.model, s.version) == (name, 1)
    assert 0 < s.time_to_first_char_ms <= s.total_ms


def test_greedy_lstm_continues_the_anthem(client: NextCharClient) -> None:
    g = client.generate("lstm", "O say can you see", 30, temperature=0.0)
    assert g.text.startswith(", by the dawn"), g.text


def test_server_draws_and_returns_a_seed_that_replays(client: NextCharClient) -> None:
    a = client.generate("gru", "O say", 80, temperature=1.0)
    b = client.generate("gru", "O say", 80, temperature=1.0)
    assert a.summary.seed != b.summary.seed
    replay = client.generate("gru", "O say", 80, temperature=1.0, seed=a.summary.seed)
    assert replay.text == a.text


def test_top_k_one_is_greedy_and_top_p_small_is_greedy(client: NextCharClient) -> None:
    greedy = client.generate("rnn", "O say", 60, temperature=0.0).text
    assert client.generate("rnn", "O say", 60, temperature=1.5, top_k=1, seed=3).text == greedy
    assert client.generate("rnn", "O say", 60, temperature=1.0, top_p=1e-6, seed=3).text == greedy


def test_stop_sequences_end_generation_and_are_not_returned(client: NextCharClient) -> None:
    full = client.generate("lstm", "O say can you see", 200, temperature=0.0).text
    stop = full[10:13]
    first = full.find(stop)
    g = client.generate("lstm", "O say can you see", 200, stop=["zzzz", stop], temperature=0.0)
    assert g.text == full[:first]
    assert g.summary.finish_reason == "stop_sequence" and g.summary.stop_sequence == stop
    assert g.summary.generated_chars == first + len(stop)
    streamed = client.generate_stream("lstm", "O say can you see", 200, stop=[stop], temperature=0.0)
    assert "".join(streamed) == full[:first] and streamed.summary.finish_reason == "stop_sequence"


def test_echo_returns_the_prompt_first(client: NextCharClient) -> None:
    plain = client.generate("gru", "O say", 30, temperature=0.0).text
    echoed = client.generate("gru", "O say", 30, echo=True, temperature=0.0).text
    assert echoed == "O say" + plain
    assert "".join(client.generate_stream("gru", "O say", 30, echo=True, temperature=0.0)) == echoed


def test_oov_policies_skip_and_replace(client: NextCharClient) -> None:
    vocab = set(client.get_model("lstm").manifest.vocab)
    assert "é" not in vocab and "#" not in vocab
    clean = client.generate("lstm", "O say", 30, temperature=0.0)
    skipped = client.generate("lstm", "O s#ay", 30, oov_policy="skip", temperature=0.0)
    assert skipped.text == clean.text and skipped.summary.prompt_chars == 5
    replaced = client.generate("lstm", "O sa#", 30, oov_policy="replace", oov_replacement="y", echo=True,
                               temperature=0.0)
    assert replaced.text == "O say" + clean.text
    assert client.score("lstm", "O sé", oov_policy="skip").scored_chars == 2


def test_predict_next_returns_top_n_with_probabilities(client: NextCharClient) -> None:
    vocab_size = len(client.get_model("lstm").manifest.vocab)
    preds = client.predict_next("lstm", "O say can you se", 5)
    assert len(preds) == 5 and preds[0].char == "e"
    assert all(a.probability >= b.probability for a, b in itertools.pairwise(preds))
    for p in preds:
        assert math.isclose(math.log(p.probability), p.logprob, rel_tol=1e-9)
    everything = client.predict_next("lstm", "O say can you se", vocab_size)
    assert math.isclose(sum(p.probability for p in everything), 1.0, rel_tol=1e-6)
    assert sorted(p.token_id for p in everything) == list(range(vocab_size))
    sharp = client.predict_next("lstm", "O say can you se", 1, temperature=0.1)
    assert sharp[0].char == "e" and sharp[0].probability > preds[0].probability


def test_score_reports_nats_and_bits(client: NextCharClient) -> None:
    text = "O say can you see, by the dawn’s early light"
    s = client.score("lstm", text, per_char=True)
    assert s.scored_chars == len(text) - 1 and len(s.per_char) == len(text) - 1
    assert "".join(c for c, _ in s.per_char) == text[1:]
    assert math.isclose(sum(lp for _, lp in s.per_char), s.total_logprob, rel_tol=1e-9)
    assert math.isclose(s.nats_per_char, -s.total_logprob / s.scored_chars, rel_tol=1e-9)
    assert math.isclose(s.bits_per_char, s.nats_per_char / math.log(2), rel_tol=1e-9)
    garbled = client.score("lstm", "yaw ynac O ees uoy,nwad eht yb")
    assert garbled.nats_per_char > s.nats_per_char  # the anthem is likelier than its scramble
    with_context = client.score("lstm", "see", context="O say can you ")
    assert with_context.scored_chars == 3 and with_context.per_char == ()


def test_health_overall_per_model_and_unknown(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "nextchar.v1.NextChar", *MODELS):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="lstm"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_async_client(server) -> None:
    import asyncio

    async def main():
        async with AsyncNextCharClient(server.address, timeout=30) as c:
            assert [m.name for m in await c.list_models()] == sorted(MODELS)
            unary = await c.generate("rnn", "O say", 50, temperature=0.7, seed=11)
            stream = c.generate_stream("rnn", "O say", 50, temperature=0.7, seed=11)
            text = "".join([piece async for piece in stream])
            assert text == unary.text and stream.summary.seed == 11
            assert (await c.predict_next("rnn", "O sa", 2))[0].probability > 0
            assert (await c.score("rnn", "O say")).scored_chars == 4
            assert await c.health() == "SERVING"
            with pytest.raises(NotFound):
                await c.get_model("nope")

    asyncio.run(main())
