"""Over gRPC == in-process onnxruntime: greedy text, fixed seeds (20 repeats), scores, predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
from philox_ref import per_step_generate

from nextchar.client.client import NextCharClient
from nextchar.server.core.artifact import load_artifact
from nextchar.server.core.engine import Engine
from nextchar.server.core.generation import GenerationRequest
from nextchar.server.core.sampling import SamplingParams
from nextchar.server.core.scoring import predict, score

MODELS = ("lstm", "gru", "rnn")
PROMPT = "O say can you see"


@pytest.fixture(scope="module")
def client(server):
    with NextCharClient(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def engines(model_repo: Path) -> dict[str, Engine]:
    out = {}
    for name in MODELS:
        engine = Engine.load(load_artifact(model_repo / name / "1"))
        engine.warmup()
        out[name] = engine
    return out


def in_process(engine: Engine, prompt: str, n: int, seed: int = 0, **sampling) -> str:
    request = GenerationRequest(prompt=prompt, max_new_chars=n, sampling=SamplingParams(**sampling),
                                seed=seed)
    return per_step_generate(engine, request)[0]  # the per-char loop with the portable sampler


@pytest.mark.parametrize("name", MODELS)
def test_greedy_over_grpc_equals_in_process(client: NextCharClient, engines: dict, name: str) -> None:
    expected = in_process(engines[name], PROMPT, 400, temperature=0.0)
    assert len(expected) == 400
    assert client.generate(name, PROMPT, 400, temperature=0.0).text == expected
    assert "".join(client.generate_stream(name, PROMPT, 400, temperature=0.0)) == expected


@pytest.mark.parametrize("name", MODELS)
def test_fixed_seed_is_identical_over_20_repeats_and_equals_in_process(
        client: NextCharClient, engines: dict, name: str) -> None:
    # Values exact in float32 (the proto's type), so the in-process run sees the very same numbers.
    options = {"temperature": 1.25, "top_k": 20, "top_p": 0.9375}
    expected = in_process(engines[name], PROMPT, 150, seed=1234, **options)
    texts = set()
    for i in range(20):
        if i % 2:
            texts.add("".join(client.generate_stream(name, PROMPT, 150, seed=1234, **options)))
        else:
            texts.add(client.generate(name, PROMPT, 150, seed=1234, **options).text)
    assert texts == {expected}
    assert expected != in_process(engines[name], PROMPT, 150, seed=4321, **options)  # the seed matters


@pytest.mark.parametrize("name", MODELS)
def test_score_over_grpc_equals_in_process(client: NextCharClient, engines: dict, name: str) -> None:
    text = "O say can you see, by the dawn’s early light, what so proudly we hail’d"
    local = score(engines[name], text, per_char=True)
    remote = client.score(name, text, per_char=True)
    assert remote.scored_chars == local.scored_chars
    assert remote.total_logprob == local.log_likelihood_nats
    assert remote.nats_per_char == local.nats_per_char and remote.bits_per_char == local.bits_per_char
    assert remote.per_char == local.per_char
    ctx_local = score(engines[name], "see", context="O say can you ")
    assert client.score(name, "see", context="O say can you ").total_logprob == ctx_local.log_likelihood_nats


@pytest.mark.parametrize("name", MODELS)
def test_predict_over_grpc_equals_in_process(client: NextCharClient, engines: dict, name: str) -> None:
    local = predict(engines[name], "O say can you s", 7)
    remote = client.predict_next(name, "O say can you s", 7)
    assert [(p.char, p.token_id, p.probability, p.logprob) for p in remote] == [
        (p.char, p.token_id, p.probability, p.logprob) for p in local]
