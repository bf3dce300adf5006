"""Operations tests' harness: `nextchar serve` as a real process, readiness from health, metrics scrapes."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ROOT, START_TIMEOUT_S, free_port, nextchar_cmd

from nextchar.v1 import admin_pb2_grpc, inference_pb2_grpc

Labels = tuple[tuple[str, str], ...]


class ServerProcess:
    """`nextchar serve --model-repo REPO --host 127.0.0.1 --port P ARGS...`; its log goes to a file, so a
    chatty request log can never fill a pipe and stall the server."""

    def __init__(self, repo: Path, *args: str, log_path: Path, env: dict[str, str] | None = None,
                 channel: Callable[[str], grpc.Channel] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.admin_address = f"127.0.0.1:{free_port()}"  # Admin's own listener (--admin-address)
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            nextchar_cmd("serve", "--model-repo", str(repo), "--host", "127.0.0.1", "--port", str(self.port),
                         "--admin-address", self.admin_address, *args),
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, text=True,
            env=None if env is None else {**__import__("os").environ, **env},
        )
        self._channel_factory = channel or grpc.insecure_channel
        self.channel = self._channel_factory(self.address)
        self.admin_channel = self._channel_factory(self.admin_address)
        self.wait_serving()

    def wait_serving(self, service: str = "") -> None:
        """Readiness from the health RPC (over this server's own transport: TLS when it has TLS)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{self.address} never reported SERVING:\n{self.log()}"
            time.sleep(0.1)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    @property
    def stub(self) -> inference_pb2_grpc.NextCharStub:
        return inference_pb2_grpc.NextCharStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.admin_channel)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        self.channel.close()
        self.admin_channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def scrape(port: int) -> dict[tuple[str, Labels], float]:
    """GET /metrics, parsed by prometheus_client's own parser: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, Labels], float], name: str, **labels: Any) -> float:
    """One sample's value, 0 when absent (a counter that never moved has no labelled child yet)."""
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)
