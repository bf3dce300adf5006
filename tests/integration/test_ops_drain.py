"""Graceful drain of a real server process: SIGTERM during 8 live streams."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ops_harness import ServerProcess
from server_harness import wait_until

from nextchar.v1 import inference_pb2 as pb

STREAMS, CHARS = 8, 3000


def test_sigterm_lets_8_live_streams_finish_refuses_new_calls_and_exits_0(model_repo: Path,
                                                                          tmp_path: Path) -> None:
    server = ServerProcess(model_repo, "--grace-seconds", "120", "--max-new-chars", str(CHARS),
                           log_path=tmp_path / "server.log")
    results: list[tuple[int, int] | str] = []
    live = [threading.Event() for _ in range(STREAMS)]

    def stream(i: int) -> None:
        request = pb.GenerateRequest(model=pb.ModelRef(name=("lstm", "gru")[i % 2]), prompt="O say",
                                     max_new_chars=CHARS, temperature=1.0, seed=i)
        try:
            chars = 0
            for message in server.stub.GenerateStream(request, timeout=120):
                live[i].set()
                if message.HasField("summary"):
                    results.append((chars, message.summary.finish_reason))
                chars += len(message.text)
        except grpc.RpcError as e:
            results.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: all(ev.is_set() for ev in live), 60, "text from all 8 streams")
        assert not results, "a stream ended before SIGTERM: make CHARS larger"
        server.proc.send_signal(signal.SIGTERM)

        def refused() -> str | None:
            health = health_pb2_grpc.HealthStub(server.channel)
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError as e:
                return e.code().name  # already gone: not reachable is also not serving
            return None if status == health_pb2.HealthCheckResponse.SERVING else "NOT_SERVING"

        assert wait_until(refused, 30, "health to leave SERVING")
        with pytest.raises(grpc.RpcError) as new_call:
            server.stub.Generate(pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="O say",
                                                    max_new_chars=5), timeout=30)
        assert new_call.value.code() is grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(120)
        assert results == [(CHARS, pb.FINISH_REASON_LENGTH)] * STREAMS
        assert server.proc.wait(60) == 0
    finally:
        server.close()
