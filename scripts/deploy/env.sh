# shellcheck shell=bash
# Paths and variables shared by the podman deployment scripts (source me; sets nothing else).
# Everything lives in one cache dir outside the repo so a second run reuses the tools and the base image.
NEXTCHAR_DEPLOY_CACHE=${NEXTCHAR_DEPLOY_CACHE:-$HOME/.cache/nextchar-deploy}
NEXTCHAR_TOOLS_VENV=$NEXTCHAR_DEPLOY_CACHE/venv
NEXTCHAR_PODMAN_SOCK=$NEXTCHAR_DEPLOY_CACHE/podman.sock
NEXTCHAR_PODMAN_PID=$NEXTCHAR_DEPLOY_CACHE/podman-service.pid
# The base image every nextchar image builds FROM here: Debian bookworm (python3.11, matching the
# cp311 CPU torch wheel) made by debootstrap, since no registry image can be pulled on this machine.
NEXTCHAR_BASE_IMAGE=${NEXTCHAR_BASE_IMAGE:-localhost/nextchar-base:bookworm}
NEXTCHAR_BASE_TAR=$NEXTCHAR_DEPLOY_CACHE/base-bookworm.tar
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Our own containers.conf, pointed at by CONTAINERS_CONF, so the system one stays untouched.
export CONTAINERS_CONF=$NEXTCHAR_DEPLOY_CACHE/containers.conf
export DOCKER_HOST=unix://$NEXTCHAR_PODMAN_SOCK
# Compose must use the classic build API: podman's Docker-compatible service has no BuildKit.
export DOCKER_BUILDKIT=0
export COMPOSE_DOCKER_CLI_BUILD=0
export PATH=$NEXTCHAR_TOOLS_VENV/bin:$PATH
