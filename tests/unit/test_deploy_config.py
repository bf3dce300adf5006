"""Deployment files checked offline: compose config, hadolint, kubernetes-validate, envoy --mode validate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
PODMAN_OVERRIDE = ROOT / "deploy" / "compose.podman.yml"
REPLICA_PORTS = {"server": 50051, "server-2": 50052, "server-3": 50053}


def tool(name: str) -> str:
    """The dev extra installs every tool next to the interpreter; a missing one is a broken install."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} not found: install the dev extra (pip install -e '.[dev]')"
        return found
    return str(path)


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120)


def compose_config(*files: Path, profile: str | None = None, cwd: Path = ROOT) -> dict:
    args: list[str | Path] = [tool("docker-compose")]
    for f in files:
        args += ["-f", f]
    if profile:
        args += ["--profile", profile]
    result = run(*args, "config", "--format", "json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- docker-compose.yml --------------------------------------------------------------------------------

def test_compose_file_is_valid_and_quiet() -> None:
    compose = ROOT / "docker-compose.yml"
    result = run(tool("docker-compose"), "-f", compose, "--profile", "scale", "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  server:\n    image: x\n    depends_on:\n      trainer:\n"
                   "        condition: when_i_feel_like_it\n")
    assert run(tool("docker-compose"), "-f", bad, "config", "-q", cwd=tmp_path).returncode != 0


def test_server_waits_for_a_successful_trainer_and_mounts_models_read_only() -> None:
    services = compose_config(ROOT / "docker-compose.yml")["services"]
    assert set(services) == {"trainer", "server"}, "the scale services belong to the 'scale' profile"
    server = services["server"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    (models,) = [v for v in server["volumes"] if v["target"] == "/models"]
    assert models["type"] == "volume" and models["read_only"] is True
    (trainer_models,) = [v for v in services["trainer"]["volumes"] if v["target"] == "/models"]
    assert trainer_models["source"] == models["source"] and not trainer_models.get("read_only")
    assert server["healthcheck"]["test"][1:4] == ["nextchar", "health", "--server"]
    assert server["ports"][0]["target"] == 50051


def test_scale_profile_puts_every_replica_behind_envoy() -> None:
    services = compose_config(ROOT / "docker-compose.yml", profile="scale")["services"]
    assert set(services) == {"trainer", "lb", "json", *REPLICA_PORTS}
    for name, port in REPLICA_PORTS.items():
        replica = services[name]
        assert replica["environment"]["NEXTCHAR_PORT"] == str(port)
        assert replica["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert replica["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    envoy = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    endpoints = {
        e["endpoint"]["address"]["socket_address"]["address"]: e["endpoint"]["address"]["socket_address"][
            "port_value"]
        for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]
    }
    assert endpoints == REPLICA_PORTS
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    route = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert {"reset", "connect-failure", "unavailable"} <= set(route["retry_policy"]["retry_on"].split(","))
    # Envoy's default of 3 concurrent retries loses calls when a replica dies with more in flight.
    (breaker,) = cluster["circuit_breakers"]["thresholds"]
    assert breaker["max_retries"] >= 3 * int(services["server"]["environment"]["NEXTCHAR_MAX_CONCURRENT"])


def test_podman_override_uses_only_the_host_network() -> None:
    config = compose_config(ROOT / "docker-compose.yml", PODMAN_OVERRIDE, profile="scale")
    for name, service in config["services"].items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), f"{name}: nothing is published with host networking"
        assert not service.get("networks"), name
        if "build" in service:
            assert service["build"].get("network") == "host", name
    for name in REPLICA_PORTS:
        assert config["services"][name]["environment"]["NEXTCHAR_HOST"] == "127.0.0.1"
    hosts = config["services"]["lb"]["extra_hosts"]
    assert sorted(hosts) == sorted(f"{name}=127.0.0.1" for name in REPLICA_PORTS)
    assert config["services"]["json"]["extra_hosts"] == ["lb=127.0.0.1"]


# --- Dockerfiles ---------------------------------------------------------------------------------------

def test_dockerfiles_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"server.Dockerfile", "trainer.Dockerfile", "envoy.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_clean_under_hadolint(dockerfile: Path) -> None:
    result = run(tool("hadolint"), "--no-color", dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_sloppy_dockerfile(tmp_path: Path) -> None:
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM debian\nRUN apt-get install curl\nCMD python3 app.py\n")
    result = run(tool("hadolint"), "--no-color", sloppy)
    assert result.returncode != 0 and "DL3006" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_take_a_base_argument_and_run_unprivileged(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert any(line.startswith("ARG BASE=") for line in text.splitlines())
    assert all(line.startswith("FROM ${BASE}") for line in text.splitlines() if line.startswith("FROM"))
    user_lines = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user_lines and user_lines[-1] == "USER 10001:10001"


def test_server_image_has_no_torch_and_a_grpc_healthcheck() -> None:
    text = (ROOT / "docker" / "server.Dockerfile").read_text()
    assert "[train]" not in text and "torch" not in text.replace("no torch", "")
    healthcheck = next(line for line in text.splitlines() if line.lstrip().startswith("CMD [\"sh\""))
    assert "nextchar health --server 127.0.0.1:${NEXTCHAR_PORT}" in healthcheck


def test_trainer_image_pins_the_same_torch_as_the_train_extra() -> None:
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    (pin,) = [r for r in extra if r.startswith("torch")]
    assert f'"{pin}"' in (ROOT / "docker" / "trainer.Dockerfile").read_text()


# --- Envoy ---------------------------------------------------------------------------------------------

def test_envoy_config_validates() -> None:
    result = run(tool("envoy"), "--mode", "validate", "-c", ROOT / "deploy" / "envoy.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_json_transcoder_reaches_the_balancer_and_knows_nextchar_v1() -> None:
    """deploy/envoy-json.yaml runs for real in tests/integration/test_json_gateway.py (local upstream)."""
    json_gw = yaml.safe_load((ROOT / "deploy" / "envoy-json.yaml").read_text())["static_resources"]
    balancer = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())["static_resources"]
    (endpoint,) = json_gw["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    lb_port = balancer["listeners"][0]["address"]["socket_address"]["port_value"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "lb", "port_value": lb_port}
    (transcoder, _router) = json_gw["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"]
    assert transcoder["typed_config"]["services"] == ["nextchar.v1.NextChar"]
    assert "COPY deploy/envoy-json.yaml /etc/envoy/envoy-json.yaml" in (
        ROOT / "docker" / "envoy-json.Dockerfile").read_text()


# --- Kubernetes ----------------------------------------------------------------------------------------

def test_kubernetes_manifests_validate_strictly() -> None:
    assert MANIFESTS, "deploy/k8s/*.yaml"
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_a_misspelt_probe(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "k8s" / "server-deployment.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("grpc: { port: 50051 }", "grcp: { port: 50051 }", 1))
    assert run(tool("kubernetes-validate"), "--strict", "--quiet", bad).returncode != 0


def _docs() -> dict[str, dict]:
    docs = [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_deployment_has_grpc_probes_and_mounts_the_model_claim_read_only() -> None:
    docs = _docs()
    pod = docs["Deployment/nextchar-server"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    (models,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert f"PersistentVolumeClaim/{models['persistentVolumeClaim']['claimName']}" in docs
    mount = next(m for m in container["volumeMounts"] if m["name"] == models["name"])
    assert mount["readOnly"] is True and mount["mountPath"] == "/models"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_hpa_and_service_point_at_the_deployment() -> None:
    docs = _docs()
    deployment = docs["Deployment/nextchar-server"]
    hpa = docs["HorizontalPodAutoscaler/nextchar-server"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = docs["Service/nextchar"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"
