"""The server with continuous batching on: same text as unbatched, concurrent streams share engine calls."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from philox_ref import per_step_generate
from server_harness import best_stop_latency, wait_until

from nextchar.client.client import AsyncNextCharClient, NextCharClient
from nextchar.server.core.artifact import load_artifact
from nextchar.server.core.engine import Engine
from nextchar.server.core.generation import FinishReason, GenerationRequest
from nextchar.server.core.sampling import SamplingParams

PROMPT = "O say can you see"


@pytest.fixture(scope="module")
def batched(make_server):
    return make_server(batching="on", max_batch_size=8, max_new_chars=100_000)


def in_process(repo: Path, name: str, n: int, seed: int, temperature: float) -> str:
    engine = Engine.load(load_artifact(repo / name / "1"))
    sampling = SamplingParams(temperature=temperature)
    request = GenerationRequest(prompt=PROMPT, max_new_chars=n, sampling=sampling, seed=seed)
    return per_step_generate(engine, request)[0]  # the per-char loop with the portable sampler


def test_one_batched_stream_equals_in_process_greedy(batched, model_repo: Path) -> None:
    with NextCharClient(batched.address) as c:
        want = in_process(model_repo, "lstm", 300, 0, 0.0)
        assert c.generate("lstm", PROMPT, 300, temperature=0.0).text == want
        assert "".join(c.generate_stream("lstm", PROMPT, 300, temperature=0.0)) == want


def test_concurrent_streams_are_batched_and_keep_their_seeded_text(batched, model_repo: Path) -> None:
    seeds = list(range(8))

    async def main() -> list[str]:
        async with AsyncNextCharClient(batched.address, timeout=60) as c:
            return list(await asyncio.gather(*(
                c.generate("gru", PROMPT, 400, temperature=1.0, seed=s) for s in seeds)))

    results = asyncio.run(main())
    stats = [b.core.stats for b in batched.runner.batchers if b.core.engine.artifact.name == "gru"]
    assert stats and max(stats[0].batch_sizes) > 1, stats  # some decode calls served several streams
    for seed, result in zip(seeds, results, strict=True):
        assert result.summary.seed == seed and result.summary.generated_chars == 400
        assert result.text == in_process(model_repo, "gru", 400, seed, 1.0), f"seed {seed}"


def test_model_instances_share_out_streams_and_keep_seeded_texts(make_server, model_repo: Path) -> None:
    """--model-instances 3: three batchers per model, each on its own thread with one onnxruntime
    thread per call; the streams spread over all three and every seeded text is the per-char loop's."""
    server = make_server(batching="on", model_instances=3, max_batch_size=8)
    seeds = list(range(12))

    async def main() -> list:
        async with AsyncNextCharClient(server.address, timeout=60) as c:
            return list(await asyncio.gather(*(
                c.generate("gru", PROMPT, 200, temperature=1.0, seed=s) for s in seeds)))

    results = asyncio.run(main())
    cores = [b.core for b in server.runner.batchers if b.core.engine.artifact.name == "gru"]
    assert len(cores) == 3 and all(c.stats.decode_calls > 0 for c in cores), [c.stats for c in cores]
    assert cores[0].engine.intra_op_threads == 1  # the instances are the parallelism
    for seed, result in zip(seeds, results, strict=True):
        assert result.text == in_process(model_repo, "gru", 200, seed, 1.0), f"seed {seed}"


def test_cancel_stops_a_batched_stream_within_100ms(batched) -> None:

    def cancel_one() -> float:
        with NextCharClient(batched.address, timeout=60) as c:
            stream = c.generate_stream("rnn", PROMPT, 100_000, temperature=1.0)
            pieces = iter(stream)
            next(pieces)
            next(pieces)
            track = batched.tracks[-1]
            cancelled_at = time.perf_counter()
            stream.cancel()
            wait_until(lambda: track.finished_at is not None, 10, "the batched generation to stop",
                       interval=0.001)
        assert track.reason is FinishReason.CANCELLED and track.steps < 100_000
        return track.finished_at - cancelled_at

    latencies = best_stop_latency(cancel_one, 0.100)
    assert min(latencies) < 0.100, f"generation stopped {latencies} s after the cancel"


@pytest.mark.parametrize(("mode", "variant", "batched"), [
    ("auto", "fp32", True), ("auto", "int8", False), ("on", "int8", True), ("off", "fp32", False)])
def test_batching_mode_decides_per_engine(make_server, mode: str, variant: str, batched: bool) -> None:
    """auto (the default) batches only engines whose warm-up proved them batch-invariant: fp32 yes,
    int8 no, so a seeded text never depends on other requests unless batching is forced on."""
    server = make_server(batching=mode, variant=variant)
    with NextCharClient(server.address, timeout=60) as c:
        assert c.generate("gru", PROMPT, 20, temperature=1.0, seed=1).summary.generated_chars == 20
    engine = server.server.servicer.registry.cached("gru").engine
    assert engine.batch_invariant is (variant == "fp32")
    assert server.runner.batches(engine) is batched
    assert bool(server.runner.batchers) is batched
