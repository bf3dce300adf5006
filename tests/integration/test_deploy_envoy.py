"""The Kubernetes Envoy config (deploy/k8s/envoy.yaml) run for real in front of two local servers: the calls
of one long-lived client connection are spread over both, and Admin is not routed.

Only the discovery differs from the cluster: the headless Service's DNS name becomes the two servers'
127.0.0.1 addresses, and the listener and admin ports become free local ports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from server_harness import ROOT, START_TIMEOUT_S, ServerThread, free_port, wait_serving, wait_until

from nextchar.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from nextchar.v1 import inference_pb2 as pb

CALLS = 40
ENVOY = Path(sys.executable).parent / "envoy"


def k8s_envoy_config() -> dict:
    (config_map,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "envoy.yaml").read_text())
                     if d and d["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["envoy.yaml"])


def generate_calls(server: ServerThread) -> float:
    """Generate calls this server finished, from its own metrics."""
    registry = server.server.ops.metrics.registry
    return sum(s.value for family in registry.collect() for s in family.samples
               if s.name == "nextchar_requests_total" and s.labels.get("method", "").endswith("Generate"))


@pytest.fixture(scope="module")
def envoy(make_server) -> Iterator[tuple[str, int, list[ServerThread]]]:
    servers = [make_server(), make_server()]
    config = k8s_envoy_config()
    port, admin_port = free_port(), free_port()
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    listener.update(address="127.0.0.1", port_value=port)
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.port}}}}
        for s in servers]}]
    path = Path(servers[0].config.model_repo).parent / f"envoy-{port}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([str(ENVOY), "-c", str(path), "--log-level", "error", "--disable-hot-restart",
                             "--base-id", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address)  # through Envoy: routed to a server its health checks found SERVING

        def healthy_hosts() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as r:
                rows = r.read().decode().splitlines()
            return sum(line.endswith("::health_flags::healthy") for line in rows) == len(servers)

        wait_until(healthy_hosts, START_TIMEOUT_S, "Envoy to find both servers healthy")
        yield address, admin_port, servers
    finally:
        proc.terminate()
        proc.wait(30)
        path.unlink(missing_ok=True)


def client_connections(admin_port: int) -> int:
    """Connections Envoy's gRPC listener has accepted so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=downstream_cx_total",
                                timeout=5) as r:
        stats = dict(line.split(": ") for line in r.read().decode().splitlines())
    return int(stats["http.grpc.downstream_cx_total"])


def test_the_calls_of_one_connection_reach_both_servers(envoy) -> None:
    address, admin_port, servers = envoy
    before = [generate_calls(s) for s in servers]
    connections = client_connections(admin_port)
    request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="o say", max_new_chars=20,
                                 temperature=0.0)
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.NextCharStub(channel)
        texts = {stub.Generate(request, timeout=30).text for _ in range(CALLS)}
    per_server = [generate_calls(s) - b for s, b in zip(servers, before, strict=True)]
    assert client_connections(admin_port) - connections == 1  # one client connection for all calls...
    assert sum(per_server) == CALLS
    assert min(per_server) >= CALLS // 8, per_server  # ...balanced per call (P(fail) ~ 1e-7 at random)
    assert len(texts) == 1  # either server gives the same greedy text


def test_admin_is_not_routed(envoy) -> None:
    address, _, _ = envoy
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as e:
        admin_pb2_grpc.AdminStub(channel).ReloadRepository(admin_pb2.ReloadRepositoryRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
