"""The Kubernetes Envoy config (deploy/k8s/envoy.yaml) run for real in front of two local servers: the calls
of one long-lived client connection are spread over both, and Admin is not routed.

Only the discovery differs from the cluster: the headless Service's DNS name becomes the two servers'
127.0.0.1 addresses, and the listener and admin ports become free local ports.
"""

from __future__ import annotations

import contextlib
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


def k8s_envoy_container() -> dict:
    (deployment,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "envoy.yaml").read_text())
                     if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@contextlib.contextmanager
def run_envoy(servers: list[ServerThread]) -> Iterator[tuple[str, int]]:
    """deploy/k8s/envoy.yaml's Envoy, with its Deployment's flags, in front of `servers`: (address,
    admin port) once it found them all healthy."""
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
    args = k8s_envoy_container()["args"]
    assert args[:2] == ["-c", "/etc/nextchar-envoy/envoy.yaml"]
    args = args[2:]
    args[args.index("--log-level") + 1] = "error"  # quiet: nobody reads its stderr until it fails
    proc = subprocess.Popen([str(ENVOY), "-c", str(path), *args, "--base-id", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address)  # through Envoy: routed to a server its health checks found SERVING

        def healthy_hosts() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=5) as r:
                rows = r.read().decode().splitlines()
            return sum(line.endswith("::health_flags::healthy") for line in rows) == len(servers)

        wait_until(healthy_hosts, START_TIMEOUT_S, "Envoy to find its servers healthy")
        yield address, admin_port
    finally:
        proc.terminate()
        proc.wait(30)
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def envoy(make_server) -> Iterator[tuple[str, int, list[ServerThread]]]:
    servers = [make_server(), make_server()]
    with run_envoy(servers) as (address, admin_port):
        yield address, admin_port, servers


def envoy_stats(admin_port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter={name}", timeout=5) as r:
        stats = dict(line.split(": ") for line in r.read().decode().splitlines())
    return int(stats[name])


def client_connections(admin_port: int) -> int:
    """Connections Envoy's gRPC listener has accepted so far."""
    return envoy_stats(admin_port, "http.grpc.downstream_cx_total")


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


def test_the_pre_stop_drain_lets_running_calls_finish_and_moves_clients_off(make_server) -> None:
    """The Deployment's preStop hook, run for real against its Envoy while a stream is running: the
    stream finishes whole, the client's connection is told to go away (GOAWAY, with the answer to its
    next call) and later calls go out on a new connection, which the draining Envoy still accepts."""
    import threading

    server = make_server()
    hook = k8s_envoy_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["python3", "-c"] and hook[3] == "15"
    engine = server.server.servicer.registry.cached("rnn").engine
    generate, release, calls = engine.generate, threading.Event(), []

    def held(*args):  # the stream's second engine call waits for the test: running during the drain
        calls.append(1)
        if len(calls) == 2:
            release.wait(20)
        return generate(*args)

    engine.generate = held
    try:
        with run_envoy([server]) as (address, admin_port), grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.NextCharStub(channel)
            n = 3000
            running = pb.GenerateRequest(model=pb.ModelRef(name="rnn"), prompt="O say", max_new_chars=n,
                                         temperature=1.0, seed=5)
            stream = stub.GenerateStream(running, timeout=60)
            text = next(stream).text
            wait_until(lambda: len(calls) == 2, 10, "the stream's second engine call")
            connections = client_connections(admin_port)
            code = hook[2].replace("127.0.0.1:9901", f"127.0.0.1:{admin_port}")
            assert code != hook[2]
            drained = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True,
                                     timeout=30)
            assert drained.returncode == 0, drained.stderr
            assert len(text) < n  # still running when the drain began
            release.set()
            text += "".join(m.text for m in stream)
            assert len(text) == n  # the running call finished, on the connection it had
            request = pb.GenerateRequest(model=pb.ModelRef(name="lstm"), prompt="o say", max_new_chars=5)
            # A call that starts on the old connection is served, and its answer carries the GOAWAY...
            assert len(stub.Generate(request, timeout=30).text) == 5
            wait_until(lambda: envoy_stats(admin_port, "http.grpc.downstream_cx_drain_close") == 1, 10,
                       "Envoy to close the client's connection for the drain")
            # ...so the next goes out on a new connection, which the draining Envoy still accepts.
            assert len(stub.Generate(request, timeout=30).text) == 5
            assert client_connections(admin_port) == connections + 1  # the client reconnected
    finally:
        release.set()  # never leave the batcher waiting
