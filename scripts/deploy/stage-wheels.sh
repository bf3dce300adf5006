#!/usr/bin/env bash
# Serve the host's CPU torch wheel on 127.0.0.1 for the trainer build (TORCH_FIND_LINKS), outside any
# build context, so no image build sends it (188 MB) and only the trainer build fetches it.
#
#   bash scripts/deploy/stage-wheels.sh start   # prints TORCH_FIND_LINKS=http://127.0.0.1:50058/ (or nothing)
#   bash scripts/deploy/stage-wheels.sh stop
# The trainer pins torch==2.13.0. On PyPI that version for linux x86_64 is the CUDA build (GBs of
# nvidia-* wheels); the CPU build (+cpu) is not on PyPI. Where the host has the CPU wheel in a local
# directory (pip's find-links, PIP_FIND_LINKS, /opt/wheels here), it is hard-linked into the deploy cache
# and served there by python's http.server on 127.0.0.1 (pip trusts loopback over plain http); builds on
# the host network (deploy/compose.podman.yml) reach it. Elsewhere pass TORCH_INDEX_URL instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=env.sh
source scripts/deploy/env.sh
dest=$NEXTCHAR_DEPLOY_CACHE/wheels
pidfile=$NEXTCHAR_DEPLOY_CACHE/wheels-server.pid
port=${NEXTCHAR_WHEELS_PORT:-50058}

stop() {
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
}

start() {
  mkdir -p "$dest"
  local staged=""
  IFS=' ' read -r -a dirs <<<"${PIP_FIND_LINKS:-} /opt/wheels"
  for dir in "${dirs[@]}"; do
    for whl in "$dir"/torch-2.13.0+cpu-cp311-*.whl; do
      [ -f "$whl" ] || continue
      [ -f "$dest/$(basename "$whl")" ] || ln "$whl" "$dest/" 2>/dev/null || cp "$whl" "$dest/"
      staged=$(basename "$whl")
      break 2
    done
  done
  if [ -z "$staged" ]; then
    echo "no local torch 2.13.0+cpu cp311 wheel found in: ${dirs[*]}; the trainer image will ask its index" >&2
    return
  fi
  stop
  nohup python3 -m http.server --bind 127.0.0.1 --directory "$dest" "$port" >"$dest.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 50); do
    if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/$staged', timeout=2).close()" \
      2>/dev/null; then
      echo "staged $staged, served at http://127.0.0.1:$port/" >&2
      echo "TORCH_FIND_LINKS=http://127.0.0.1:$port/"
      return
    fi
    sleep 0.2
  done
  echo "the wheel server on 127.0.0.1:$port did not answer; see $dest.log" >&2
  exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
