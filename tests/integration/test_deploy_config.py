"""Deployment files checked offline: compose config, hadolint, kubernetes-validate, envoy --mode validate."""

from __future__ import annotations

import json
import re
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
PUBLIC_PATHS = ("/nextchar.v1.NextChar/Generate", "/inference.GRPCInferenceService/ModelInfer",
                "/grpc.health.v1.Health/Check",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
ADMIN_PATHS = ("/nextchar.v1.Admin/LoadModel", "/nextchar.v1.Admin/ReloadRepository")


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
    # The replicas share the host's loopback: each binds Admin on a loopback port of its own.
    admin = [config["services"][name]["environment"]["NEXTCHAR_ADMIN_ADDRESS"] for name in REPLICA_PORTS]
    assert all(a.startswith("127.0.0.1:") for a in admin) and len(set(admin)) == len(REPLICA_PORTS)
    assert not {int(a.rpartition(":")[2]) for a in admin} & set(REPLICA_PORTS.values())
    hosts = config["services"]["lb"]["extra_hosts"]
    assert sorted(hosts) == sorted(f"{name}=127.0.0.1" for name in REPLICA_PORTS)
    assert config["services"]["json"]["extra_hosts"] == ["lb=127.0.0.1"]


def test_every_container_is_hardened_and_limited() -> None:
    services = compose_config(ROOT / "docker-compose.yml", profile="scale")["services"]
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert any(t.split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), name
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory", "pids"} <= set(limits), f"{name}: {limits}"
        assert int(limits["memory"]) <= 4 << 30, name
        assert not service.get("privileged") and not service.get("cap_add"), name


def test_only_grpc_is_published_on_every_interface() -> None:
    services = compose_config(ROOT / "docker-compose.yml", profile="scale")["services"]
    published = {(name, p["target"]): p.get("host_ip")
                 for name, s in services.items() for p in s.get("ports", [])}
    # Metrics describe the traffic: loopback only by default; nothing else (Admin above all) is published.
    assert published == {("server", 50051): None, ("server", 9090): "127.0.0.1", ("lb", 50050): None,
                         ("json", 8080): None}


def _route_prefixes() -> dict[str, list[str]]:
    configs = {"compose": yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text()), "k8s": k8s_envoy()}
    out = {}
    for name, config in configs.items():
        routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        assert all(r["route"] == routes[0]["route"] for r in routes), "one route action for every service"
        out[name] = [r["match"]["prefix"] for r in routes]
    return out


@pytest.mark.parametrize("config", ["compose", "k8s"])
def test_envoy_routes_the_public_services_and_never_admin(config: str) -> None:
    prefixes = _route_prefixes()[config]
    assert all(any(path.startswith(p) for p in prefixes) for path in PUBLIC_PATHS)
    assert not any(path.startswith(p) for p in prefixes for path in ADMIN_PATHS)


def _dockerignore(context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of context/.dockerignore, in Docker's glob dialect."""
    rules = []
    for line in (context / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((not negate, re.compile(regex)))
    return rules


def build_context(context: Path) -> dict[str, int]:
    """The files a build of `context` sends (path -> size): Docker's rule, the last matching line wins and
    a line matching a parent directory matches the file."""
    rules = _dockerignore(context)
    files = {}
    for path in context.rglob("*"):
        rel = path.relative_to(context).as_posix()
        if rel.split("/")[0] in (".git", ".venv") or not path.is_file():
            continue
        parents = [rel.rsplit("/", i)[0] for i in range(rel.count("/") + 1)]
        excluded = False
        for exclude, regex in rules:
            if any(regex.fullmatch(p) for p in parents):
                excluded = exclude
        if not excluded:
            files[rel] = path.stat().st_size
    return files


def test_each_build_sends_only_what_its_image_needs(tmp_path: Path) -> None:
    services = compose_config(ROOT / "docker-compose.yml", profile="scale")["services"]
    contexts = {name: Path(s["build"]["context"]) for name, s in services.items() if "build" in s}
    assert contexts == {"server": ROOT, "trainer": ROOT, "json": ROOT, "lb": ROOT / "deploy"}
    sources = build_context(ROOT)
    assert not [f for f in sources if f.endswith((".whl", ".onnx", ".pt"))]
    assert {"pyproject.toml", "scripts/gen_proto.py", "scripts/deploy/train-models.sh"} <= set(sources)
    # The json transcoder's two files are the only ones outside the package sources.
    assert sorted(f for f in sources if f.startswith(("scripts/", "deploy/"))) == [
        "deploy/envoy-json.yaml", "scripts/deploy/train-models.sh", "scripts/gen_proto.py",
        "scripts/json_gateway.py"]
    assert not [f for f in sources if f.startswith(("tests/", "docs/", "bench/", "docker/", "deploy/k8s"))]
    assert sum(sources.values()) < 4 << 20, "the sources' context grew past 4 MB"
    assert set(build_context(ROOT / "deploy")) == {"envoy.yaml"}
    # The matcher itself: a wheel dropped anywhere stays out of the context.
    (tmp_path / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    for rel in ("server/x.py", "docker/wheels/torch.whl", "server/__pycache__/x.pyc", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert set(build_context(tmp_path)) == {"server/x.py"}


def test_every_copy_source_is_in_its_context() -> None:
    contexts = {"server.Dockerfile": ROOT, "trainer.Dockerfile": ROOT, "envoy-json.Dockerfile": ROOT,
                "envoy.Dockerfile": ROOT / "deploy"}
    for dockerfile, context in contexts.items():
        sent = build_context(context)
        for line in (ROOT / "docker" / dockerfile).read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert any(f == src.rstrip("/") or f.startswith(src.rstrip("/") + "/") for f in sent), \
                        f"{dockerfile}: {src} is not in its build context"


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_stages_carry_the_label_compose_smoke_prunes(dockerfile: Path) -> None:
    stages = dockerfile.read_text().split("\nFROM ")[1:]
    assert len(stages) >= 2
    *builders, final = stages
    assert all("\nLABEL io.nextchar.stage=build\n" in stage for stage in builders)
    assert "io.nextchar.stage" not in final
    assert "io.nextchar.stage=build" in (ROOT / "scripts" / "compose_smoke.sh").read_text()


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

def k8s_envoy() -> dict:
    (config_map,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "envoy.yaml").read_text())
                     if d and d["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["envoy.yaml"])


def test_envoy_config_validates() -> None:
    result = run(tool("envoy"), "--mode", "validate", "-c", ROOT / "deploy" / "envoy.yaml")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_k8s_envoy_config_validates_and_matches_the_compose_one(tmp_path: Path) -> None:
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(k8s_envoy()))
    result = run(tool("envoy"), "--mode", "validate", "-c", config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    compose = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())["static_resources"]
    k8s = k8s_envoy()["static_resources"]
    assert k8s["listeners"] == compose["listeners"]  # same routes, retries and timeouts
    discovery = {"type", "load_assignment", "dns_lookup_family", "dns_refresh_rate"}
    (c1,), (c2,) = compose["clusters"], k8s["clusters"]
    assert {k: v for k, v in c1.items() if k not in discovery} == {k: v for k, v in c2.items()
                                                                   if k not in discovery}


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
    # Ready = grpc.health.v1 on the public port says SERVING; started/alive = the port accepts connections,
    # so a pod waiting NOT_SERVING for its first model is neither killed nor restarted.
    assert container["readinessProbe"]["grpc"] == {"port": port}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == container["ports"][0]["name"] == "grpc", probe
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


def _pod_specs() -> dict[str, dict]:
    return {key: doc["spec"]["template"]["spec"] for key, doc in _docs().items()
            if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")}


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    pods = _pod_specs()
    assert set(pods) >= {"Deployment/nextchar-server", "Deployment/nextchar-lb", "Job/nextchar-trainer"}
    for key, pod in pods.items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, key
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, key
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), key
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], key
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), key
            assert sc["capabilities"] == {"drop": ["ALL"]}, key
            assert sc["readOnlyRootFilesystem"] is True, key
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), key


def test_the_hpa_alone_sets_the_server_replica_count() -> None:
    docs = _docs()
    for hpa in (d for d in docs.values() if d["kind"] == "HorizontalPodAutoscaler"):
        target = docs[f"{hpa['spec']['scaleTargetRef']['kind']}/{hpa['spec']['scaleTargetRef']['name']}"]
        # A fixed count would be reapplied by every `kubectl apply` and fight the HPA.
        assert "replicas" not in target["spec"]


def test_server_pods_hot_reload_and_export_metrics() -> None:
    (container,) = _pod_specs()["Deployment/nextchar-server"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert float(env["NEXTCHAR_RELOAD_INTERVAL"]) > 0  # also what keeps an empty volume from failing start-up
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(env["NEXTCHAR_METRICS_PORT"]) == ports["metrics"]
    assert int(env["NEXTCHAR_PORT"]) == ports["grpc"]


def test_k8s_envoy_balances_over_the_headless_service() -> None:
    docs = _docs()
    headless = docs["Service/nextchar-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    (cluster,) = k8s_envoy()["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "nextchar-headless", "port_value": headless["spec"]["ports"][0]["port"]}
    lb = docs["Deployment/nextchar-lb"]
    pod = lb["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == "nextchar-envoy" and mount["name"] == volume["name"]
    assert container["args"][:2] == ["-c", f"{mount['mountPath']}/envoy.yaml"]
    service = docs["Service/nextchar-lb"]
    assert service["spec"]["selector"].items() <= lb["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == k8s_envoy()["static_resources"]["listeners"][0]["address"][
        "socket_address"]["port_value"]
