"""Memory follows the configuration, not what callers send (issue 13.2): a 3,000-character vocabulary,
32 concurrent 10,000-character Score and 32 Generate calls; every call succeeds or is refused with
RESOURCE_EXHAUSTED naming the budget, and the server's peak RSS stays under idle + budget + a margin.

Measured before chunked prefill/scoring (main at f679b60): 2 Score + 2 Generate such calls took the
server's peak RSS from 96 MB to 2.98 GB."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from ops_harness import ServerProcess

from nextchar.v1 import inference_pb2 as pb

VOCAB = [chr(0x4E00 + i) for i in range(3000)]
TEXT = "".join(VOCAB[i % len(VOCAB)] for i in range(10_000))
CALLS = 32  # of each kind, all at once
BUDGET_MB = 256
# What the budget's estimate leaves out: allocator slack, thread stacks, gRPC buffers (measured: 80 MB).
MARGIN_MB = 192


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def big_vocab_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from nextchar.training.config import ModelConfig
    from nextchar.training.export import export_model
    from nextchar.training.model import CharModel

    torch.manual_seed(0)
    repo = tmp_path_factory.mktemp("big_vocab")
    model = CharModel(ModelConfig(vocab_size=len(VOCAB), cell="lstm", hidden_size=16, num_layers=1))
    export_model(model, VOCAB, repo, "big", 1)
    return repo


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_concurrent_long_calls_stay_within_the_memory_budget(big_vocab_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(big_vocab_repo, "--memory-budget-mb", str(BUDGET_MB),
                           log_path=tmp_path / "server.log")
    try:
        idle = _peak_rss_mb(server.proc.pid)
        stub, ref = server.stub, pb.ModelRef(name="big")

        def call(kind: str) -> str:
            try:
                if kind == "score":
                    stub.Score(pb.ScoreRequest(model=ref, text=TEXT), timeout=120)
                else:
                    stub.Generate(pb.GenerateRequest(model=ref, prompt=TEXT, max_new_chars=5), timeout=120)
                return f"{kind} OK"
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (kind, e.code(), e.details())
                assert "--memory-budget-mb" in e.details() or "max_concurrent" in e.details(), e.details()
                return f"{kind} {e.code().name}"

        with ThreadPoolExecutor(2 * CALLS) as pool:
            outcomes = list(pool.map(call, ["score", "generate"] * CALLS))
        peak = _peak_rss_mb(server.proc.pid)
        assert "score OK" in outcomes and "generate OK" in outcomes, outcomes
        assert peak < idle + BUDGET_MB + MARGIN_MB, (idle, peak, outcomes)
        # Still serving, and the budget was given back.
        assert stub.Score(pb.ScoreRequest(model=ref, text=TEXT), timeout=120).scored_chars == len(TEXT) - 1
    finally:
        assert server.terminate() == 0
